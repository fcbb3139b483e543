"""Generation throughput of the answer backends: HF (rpo.sampling) and llama.cpp (rpo.llamacpp), greedy and
sampled, side by side in one run; and the HF sampler against one `model.generate` per prompt (naive).

    python -m benchmarks.generation_throughput           # SmolLM2-135M, 32 IFEval prompts, ~10 min on 2 cores
    python -m benchmarks.generation_throughput --smoke   # tiny random model
    python -m benchmarks.generation_throughput --generators naive,hf --modes greedy   # the earlier comparison

Generators:
    hf             rpo.sampling.generate_answers with the transformers model, as the rules run it
    llamacpp-f32   the same function with an rpo.llamacpp.Engine on the model's GGUF (rpo.gguf.write_model,
    llamacpp-f16   with f32, f16, bf16 or q8_0 weights), written once before the runs; writing it is timed
    llamacpp-bf16  apart
    llamacpp-q8_0
    naive          `model.generate(do_sample=False)` once per prompt with the same stop tokens (greedy only)
Modes:
    greedy         Table 1's answers: one per prompt, temperature 0, batches of 16 prompts
    sampled        make_data's samples: 4 per prompt at temperature 0.8, top-p 0.95, top-k 50, batches of 16
Tokens/s = new tokens up to the stop token / wall time of the whole call (prompt encoding and the answer file
included, the model loaded before); the runs alternate over `--repeats` and the median time is reported, with the
1-minute load average at each run (the machine is shared). For each generator and mode, `identical_to_hf` is the
share of answers with the same text as the hf generator's (greedy: where the kernels change no argmax; sampled:
the same seeded draws on slightly different logits). Exit status 1 if the naive loop's greedy text differs from
hf's (the same model and kernels: it must not).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import common

NAME = "generation_throughput"
MODES = {
    "greedy": {"num_return_sequences": 1, "temperature": 0.0, "top_p": 1.0, "top_k": 0},
    "sampled": {"num_return_sequences": 4, "temperature": 0.8, "top_p": 0.95, "top_k": 50},
}
GENERATORS = ("hf", "llamacpp-f32", "llamacpp-f16", "llamacpp-bf16", "llamacpp-q8_0", "naive")


def get_prompts(args, tok, n: int) -> list[dict]:
    if args.smoke:
        rows = common.make_pairs(tok, n, **common.LENGTHS["smoke"], seed=3)
        return [{"id": r["id"], "messages": r["prompt"]} for r in rows]
    from rpo.verifiable import load_prompts
    rows = load_prompts()
    random.Random(0).shuffle(rows)
    return [{"id": f"ifeval-{r['key']}", "messages": [{"role": "user", "content": r["prompt"]}]} for r in rows[:n]]


def naive(model, tok, prompts, max_new_tokens: int) -> list[list[tuple[str, int]]]:
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
        out.append([(tok.decode(new[:n], skip_special_tokens=True).strip(), n)])
    return out


def answers(model, tok, prompts, mode: str, max_new_tokens: int, batch_size: int, work: Path):
    """rpo.sampling.generate_answers, as the rules run it (a fresh answer file), with `model` a transformers
    model or an rpo.llamacpp.Engine."""
    from rpo.sampling import generate_answers
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        rows = generate_answers(model, tok, prompts, Path(tmp) / "answers.jsonl", max_new_tokens=max_new_tokens,
                                batch_size=batch_size, seed=0, **MODES[mode])
    return [list(zip(r["responses"], r["n_tokens"])) for r in rows]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    common.add_common_args(ap, NAME)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64, help="the quickstart's Table-1 and make_data setting")
    ap.add_argument("--batch-size", type=int, default=16, help="the quickstart's Table-1 and make_data setting")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--generators", default="hf,llamacpp-f32,llamacpp-f16",
                    help=f"comma-separated, of {','.join(GENERATORS)}")
    ap.add_argument("--modes", default="greedy,sampled", help=f"comma-separated, of {','.join(MODES)}")
    args = ap.parse_args(argv)
    gens, modes = args.generators.split(","), args.modes.split(",")
    bad = [g for g in gens if g not in GENERATORS] + [m for m in modes if m not in MODES]
    if bad or "hf" not in gens:
        ap.error(f"unknown generators/modes {bad}, or no hf (every share is against hf's answers)")
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
    print(f"model {mdir}, {len(prompts)} prompts, max_new_tokens {args.max_new_tokens}, batch {args.batch_size}, "
          f"{args.repeats} repeats, {torch.get_num_threads()} threads", flush=True)

    engines, export_s = {}, {}
    for g in gens:
        if g.startswith("llamacpp"):
            from rpo.gguf import write_model
            from rpo.llamacpp import Engine
            dtype = g.split("-")[1]
            t = time.perf_counter()
            path = write_model(mdir, work / f"model-{dtype}.gguf", dtype=dtype, model=model)
            export_s[g] = time.perf_counter() - t
            engines[g] = Engine(path, sources=((mdir,),), n_threads=torch.get_num_threads())

    runs = [(g, m) for m in modes for g in gens if not (g == "naive" and m != "greedy")]
    for g in engines:  # untimed: llama.cpp's first decode sets up its compute graph
        answers(engines[g], tok, prompts[:2], "greedy", 2, args.batch_size, work)
    times, loads, results = {r: [] for r in runs}, {r: [] for r in runs}, {}
    for rep in range(args.repeats):
        for g, m in (runs if rep % 2 == 0 else runs[::-1]):
            loads[(g, m)].append(round(os.getloadavg()[0], 2))
            t = time.perf_counter()
            res = naive(model, tok, prompts, args.max_new_tokens) if g == "naive" else \
                answers(engines.get(g, model), tok, prompts, m, args.max_new_tokens, args.batch_size, work)
            times[(g, m)].append(time.perf_counter() - t)
            results.setdefault((g, m), res)
            print(f"  repeat {rep} {g} {m}: {times[(g, m)][-1]:.2f} s (load {loads[(g, m)][-1]})", flush=True)
    for e in engines.values():
        e.close()

    rows = []
    for g, m in runs:
        res, ref = results[(g, m)], results[("hf", m)]
        tokens = sum(n for a in res for _, n in a)
        secs = common.median(times[(g, m)])
        pairs = [(x[0], y[0]) for a, b in zip(res, ref) for x, y in zip(a, b)]
        rows.append({"generator": g, "mode": m, "prompts": len(prompts), "answers": len(pairs), "new_tokens": tokens,
                     "median_s": secs, "tokens_per_s": tokens / secs,
                     "identical_to_hf": sum(x == y for x, y in pairs) / len(pairs),
                     "seconds": [round(s, 3) for s in times[(g, m)]], "load_1min": loads[(g, m)],
                     "gguf_export_s": round(export_s[g], 2) if g in export_s else None})
    for r in rows:
        base = next(x for x in rows if x["generator"] == "hf" and x["mode"] == r["mode"])
        r["speedup_vs_hf"] = r["tokens_per_s"] / base["tokens_per_s"]
    table = common.print_table(rows, ["generator", "mode", "answers", "new_tokens", "median_s", "tokens_per_s",
                                      "speedup_vs_hf", "identical_to_hf", "load_1min"])
    naive_ok = all(r["identical_to_hf"] == 1.0 for r in rows if r["generator"] == "naive")
    out = common.write_json(common.out_path(args, NAME), {
        "benchmark": NAME, "machine": common.finish(info), "model_dir": str(mdir), "threads": torch.get_num_threads(),
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "modes": {m: MODES[m] for m in modes},
        "naive_identical_to_hf": naive_ok, "results": rows, "table": table})
    print(f"wrote {out}")
    return 0 if naive_ok else 1


if __name__ == "__main__":
    sys.exit(main())
