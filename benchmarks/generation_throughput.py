"""Generation throughput: our batched HF sampler (rpo.sampling) vs one prompt at a time, greedy.

    python -m benchmarks.generation_throughput           # SmolLM2-135M, 32 IFEval prompts, ~4 min on CPU
    python -m benchmarks.generation_throughput --smoke   # tiny random model

Ours is `rpo.sampling.generate_answers` itself (length-sorted batches, one prefill per batch, the KV
cache reused), as the Table-1 rule runs it; the baseline is `model.generate(do_sample=False)` called
once per prompt with the same stop tokens. Both are greedy, so their answers must be the same text
(checked, prompt by prompt). Tokens/s = new tokens up to the stop token / wall time; the two runs
alternate (`--repeats`), the median time of each is reported.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import common

NAME = "generation_throughput"


def get_prompts(args, tok, n: int) -> list[dict]:
    if args.smoke:
        rows = common.make_pairs(tok, n, **common.LENGTHS["smoke"], seed=3)
        return [{"id": r["id"], "messages": r["prompt"]} for r in rows]
    from rpo.verifiable import load_prompts
    rows = load_prompts()
    random.Random(0).shuffle(rows)
    return [{"id": f"ifeval-{r['key']}", "messages": [{"role": "user", "content": r["prompt"]}]} for r in rows[:n]]


def naive(model, tok, prompts, max_new_tokens: int) -> list[tuple[str, int]]:
    """One `model.generate` per prompt: the loop a script writes first."""
    stop = [t for t in {tok.eos_token_id, tok.pad_token_id} if t is not None]
    out = []
    for p in prompts:
        enc = tok.apply_chat_template(p["messages"], add_generation_prompt=True, return_tensors="pt")
        ids = enc["input_ids"] if hasattr(enc, "keys") else enc
        ids = ids.to(model.device)
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=stop)
        new = gen[0, ids.shape[1]:].tolist()
        n = next((i for i, t in enumerate(new) if t in stop), len(new))
        out.append((tok.decode(new[:n], skip_special_tokens=True).strip(), n))
    return out


def ours(model, tok, prompts, max_new_tokens: int, batch_size: int, work: Path) -> list[tuple[str, int]]:
    from rpo.sampling import generate_answers
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        rows = generate_answers(model, tok, prompts, Path(tmp) / "answers.jsonl", max_new_tokens=max_new_tokens,
                                batch_size=batch_size, temperature=0.0)
    return [(r["responses"][0], r["n_tokens"][0]) for r in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    common.add_common_args(ap, NAME)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64, help="the quickstart's Table-1 setting")
    ap.add_argument("--batch-size", type=int, default=16, help="the quickstart's Table-1 setting")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    if args.smoke:
        args.prompts, args.max_new_tokens, args.repeats = min(args.prompts, 6), min(args.max_new_tokens, 8), 1
    common.set_threads(args)
    work = common.workdir(args, NAME)
    mdir = common.model_dir(args, work)
    from rpo.models import load_model, load_tokenizer
    tok = load_tokenizer(mdir)
    model = load_model(mdir, dtype="bfloat16" if args.device == "cuda" else "float32", device=args.device).eval()
    prompts = get_prompts(args, tok, args.prompts)
    info = common.machine(args.device)
    print(f"model {mdir}, {len(prompts)} prompts, max_new_tokens {args.max_new_tokens}, "
          f"batch {args.batch_size}, {args.repeats} repeats", flush=True)

    times = {"ours": [], "naive": []}
    answers = {}
    for rep in range(args.repeats):
        for name in (("naive", "ours") if rep % 2 == 0 else ("ours", "naive")):
            if args.device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            res = naive(model, tok, prompts, args.max_new_tokens) if name == "naive" else \
                ours(model, tok, prompts, args.max_new_tokens, args.batch_size, work)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
            answers.setdefault(name, res)
            print(f"  repeat {rep} {name}: {times[name][-1]:.2f} s", flush=True)

    mismatches = [p["id"] for p, a, b in zip(prompts, answers["ours"], answers["naive"]) if a[0] != b[0]]
    rows = []
    for name in ("naive", "ours"):
        tokens = sum(n for _, n in answers[name])
        secs = common.median(times[name])
        rows.append({"generator": name, "prompts": len(prompts), "new_tokens": tokens, "median_s": secs,
                     "tokens_per_s": tokens / secs, "seconds": [round(s, 3) for s in times[name]]})
    rows[1]["speedup_vs_naive"] = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    table = common.print_table(rows, ["generator", "prompts", "new_tokens", "median_s", "tokens_per_s",
                                      "speedup_vs_naive"])
    ok = not mismatches
    print(f"identical greedy text: {ok}" + ("" if ok else f" (differs for {mismatches})"))
    out = common.write_json(common.out_path(args, NAME), {
        "benchmark": NAME, "machine": common.finish(info), "model_dir": str(mdir),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size, "identical_text": ok, "mismatched_ids": mismatches, "results": rows,
        "table": table})
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
