"""Cost per token of a fused model (eval/fusion.py) against plain decoding of its large model, greedy.

    python -m benchmarks.fusion_cost              # SmolLM2-135M parts, 32 IFEval prompts, 64 tokens, ~5 min on 2 CPUs
    python -m benchmarks.fusion_cost --smoke      # tiny random model, seconds

Three decoders over the same prompts, batches and sampler (rpo.sampling.sample, the HF backend's; batches of
--batch-size prompts, length-sorted as generate_answers sorts them):
    plain     the large model alone (what the HF backend runs for a trained model)
    proxy     the fused model with alpha 1: large + expert − small, three models per step (proxy tuning)
    dynamic   the fused model with Dynamic Logits Fusion's per-step alpha search (21 grid points per step)
The parts are the quickstart's fused model in shape: the large model is the base plus a LoRA adapter merged (as
the SFT reference is), the small model is the base, the expert the base plus another adapter merged: three
distinct 135M models in memory. Stop tokens are switched off, so every row decodes exactly --max-new-tokens
tokens and the three decoders do the same number of steps: ms per token = wall time / (prompts x tokens). The
decoders alternate over --repeats, the median of each is reported. `search_ms_per_step`: the fusion arithmetic
alone (fuse() on one batch's logits, fixed alpha vs the search), from timing it 20 times.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks import common

NAME = "fusion_cost"


def adapter(model_dir, out: Path, seed: int) -> Path:
    """A LoRA adapter with small random non-zero weights on every attention and MLP projection."""
    if (out / "adapter_config.json").is_file():
        return out
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = LoraConfig(r=8, lora_alpha=16, init_lora_weights="gaussian",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft = get_peft_model(model, cfg)
    with torch.no_grad():  # gaussian init leaves B = 0 (the adapter a no-op); give B small random values
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    peft.save_pretrained(out)
    return out


def fused(mdir, large, expert, out: Path, alpha) -> str:
    from eval.fusion import make_fused_model
    return str(make_fused_model(
        name=out.name, parts={"large": "large", "small": "base", "experts": ["expert"]}, alpha=alpha,
        alpha_grid={"max": 2.0, "step": 0.1}, vocab_check="exact",
        dirs={"large": {"ref_dir": str(mdir), "policy_dir": str(large)}, "small": {"ref_dir": str(mdir)},
              "experts": [{"ref_dir": str(mdir), "policy_dir": str(expert)}]}, out=out))


def batches(tok, prompts, batch_size: int):
    from rpo.sampling import encode_row, left_pad
    enc = sorted((encode_row(tok, p) for p in prompts), key=len)
    return [left_pad(enc[i:i + batch_size], tok.pad_token_id) for i in range(0, len(enc), batch_size)]


def decode(model, tok, data, max_new_tokens: int, device: str) -> float:
    from rpo.sampling import sample
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for ids, attn in data:
        new = sample(model, ids.to(device), attn.to(device), max_new_tokens=max_new_tokens, stop_ids=(),
                     pad_id=tok.pad_token_id)
        assert new.shape[1] == max_new_tokens  # no stop tokens: every row decodes every step
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def search_ms(model, data, device: str, reps: int = 20) -> dict:
    """The fusion arithmetic alone on one batch's last-position logits: fixed alpha vs the dynamic search."""
    from eval.fusion import DYNAMIC, fuse
    ids, attn = data[-1]
    with torch.no_grad():
        out = [m(input_ids=ids.to(device), attention_mask=attn.to(device), logits_to_keep=1).logits[:, -1].float()
               for m in (model.large, model.small, model.experts[0])]
    res = {}
    for name, alpha in (("fixed", 1.0), ("dynamic", DYNAMIC)):
        fuse(out[0], out[1], out[2:], alpha, model.grid)
        t = time.perf_counter()
        for _ in range(reps):
            fuse(out[0], out[1], out[2:], alpha, model.grid)
        res[name] = 1000 * (time.perf_counter() - t) / reps
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    common.add_common_args(ap, NAME)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64, help="the quickstart's Table-1 setting")
    ap.add_argument("--batch-size", type=int, default=16, help="the quickstart's Table-1 setting")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    if args.smoke:
        args.prompts, args.max_new_tokens, args.repeats = min(args.prompts, 6), min(args.max_new_tokens, 6), 1
    common.set_threads(args)
    work = common.workdir(args, NAME)
    mdir = common.model_dir(args, work)
    info = common.machine(args.device)
    from benchmarks.generation_throughput import get_prompts
    from eval.fusion import load_fused
    from rpo.models import load_policy, load_tokenizer
    large, expert = adapter(mdir, work / "large_adapter", 1), adapter(mdir, work / "expert_adapter", 2)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    tok = load_tokenizer(mdir)
    models = {"plain": load_policy(mdir, large, dtype=dtype, device=args.device).eval(),
              "proxy": load_fused(fused(mdir, large, expert, work / "proxy", 1.0), dtype, args.device)[1],
              "dynamic": load_fused(fused(mdir, large, expert, work / "dynamic", "dynamic"), dtype, args.device)[1]}
    prompts = get_prompts(args, tok, args.prompts)
    data = batches(tok, prompts, args.batch_size)
    print(f"model {mdir}, {len(prompts)} prompts, {args.max_new_tokens} tokens each, batch {args.batch_size}, "
          f"{args.repeats} repeats, torch threads {torch.get_num_threads()}", flush=True)
    times = {name: [] for name in models}
    for rep in range(args.repeats):
        order = list(models) if rep % 2 == 0 else list(reversed(models))
        for name in order:
            times[name].append(decode(models[name], tok, data, args.max_new_tokens, args.device))
            print(f"  repeat {rep} {name}: {times[name][-1]:.2f} s", flush=True)
    tokens = len(prompts) * args.max_new_tokens
    rows = []
    for name in models:
        secs = common.median(times[name])
        rows.append({"decoder": name, "tokens": tokens, "median_s": round(secs, 3),
                     "ms_per_token": round(1000 * secs / tokens, 3), "seconds": [round(s, 3) for s in times[name]]})
    for r in rows:
        r["x_plain"] = round(r["ms_per_token"] / rows[0]["ms_per_token"], 3)
    search = search_ms(models["dynamic"], data, args.device)
    table = common.print_table(rows, ["decoder", "tokens", "median_s", "ms_per_token", "x_plain"])
    print(f"fusion arithmetic per step ({data[-1][0].shape[0]} rows, vocabulary {len(tok)}): fixed alpha "
          f"{search['fixed']:.2f} ms, dynamic search {search['dynamic']:.2f} ms")
    out = common.write_json(common.out_path(args, NAME), {
        "benchmark": NAME, "machine": common.finish(info), "model_dir": str(mdir), "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "results": rows,
        "search_ms_per_step": search, "table": table})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
