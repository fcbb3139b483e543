"""The sharded training path end to end on one device: FSDP2 full sharding at world size 1 (a one-process
group), bf16 on GPU, a checkpoint, an interruption, a resume, and the final gathered save.

    python -m benchmarks.sharded_check --device cuda --shape 1b   # a randomly initialised 1B-shape Llama
    python -m benchmarks.sharded_check --smoke                    # tiny random model on CPU (tests)

Two runs of the same 8 optimizer steps (full fine-tuning, checkpoint every 2): one uninterrupted, one
interrupted before step 6 and started again (it must resume from the checkpoint of step 4). Reported:
seconds per step, tokens per second, peak memory, the checkpoint's size and save time, the final save's
time, whether the saved model loads with `from_pretrained`, and the largest weight difference between the
resumed and the uninterrupted run (0 on CPU in fp32; bf16 GPU kernels need not be bitwise repeatable).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks import common

NAME = "sharded_check"
STEPS, INTERRUPT_AT, EVERY = 8, 5, 2


class _Interrupt(Exception):
    pass


def config(args, lengths: dict) -> dict:
    return {"finetuning": "full", "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "top_layers": None,
                                           "target_modules": ["q_proj", "v_proj"]},
            "learning_rate": 1e-5, "lr_scheduler": "cosine", "warmup_ratio": 0.1, "epochs": 1, "max_steps": STEPS,
            "micro_batch_size": args.micro_batch, "global_batch_size": 2 * args.micro_batch,
            "max_length": lengths["max_length"], "max_prompt_length": lengths["max_prompt_length"],
            "weight_decay": 0.0, "max_grad_norm": 1.0,
            "precision": "bfloat16" if args.device == "cuda" else "float32",
            "sharding": "full", "gradient_checkpointing": args.device == "cuda",
            "checkpoint_every": EVERY, "seed": 42, "world_size": 1}


def _run(spec: dict, tag: str, interrupt: bool) -> dict:
    from rpo import train
    work = Path(spec["work"])
    stamps, armed = [], [interrupt]

    def hook(step, model):
        if spec["device"] == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if armed[0] and step == INTERRUPT_AT:
            armed[0] = False
            raise _Interrupt

    kw = dict(ref_dir=spec["model_dir"], pairs_path=spec["pairs"], reference_cache=spec["cache"],
              out_dir=work / tag / "model", metrics_path=work / tag / "metrics.jsonl",
              summary_path=work / tag / "train_summary.json", ckpt_dir=work / f"ck-{tag}", cfg=spec["cfg"],
              method={"name": "dpo", "loss": "dpo", "beta": 0.1})
    info = {}
    if interrupt:
        try:
            train.train_preference(**kw, grad_hook=hook)
        except _Interrupt:
            ck = work / f"ck-{tag}" / f"step-{INTERRUPT_AT - INTERRUPT_AT % EVERY:06d}"
            info["checkpoint_mib"] = round(sum(f.stat().st_size for f in ck.rglob("*") if f.is_file()) / 2**20, 1)
        stamps.clear()
    t_end = [0.0]
    orig = train.save_trained

    def timed_save(*a, **k):
        t0 = time.perf_counter()
        orig(*a, **k)
        t_end[0] = time.perf_counter() - t0

    train.save_trained = timed_save
    try:
        summary = train.train_preference(**kw, grad_hook=hook)
    finally:
        train.save_trained = orig
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {**info, "resumed_from_step": summary["resumed_from_step"], "sharding": summary["sharding"],
            "median_step_s": round(common.median(gaps), 4) if gaps else None, "final_save_s": round(t_end[0], 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(ap, NAME)
    ap.add_argument("--micro-batch", type=int, default=2)
    args = ap.parse_args(argv)
    common.set_threads(args)
    work = common.workdir(args, NAME)
    mdir = common.model_dir(args, work)
    lengths = common.lengths_for(args)
    from rpo import train
    from rpo.models import load_model, load_tokenizer
    tok = load_tokenizer(mdir)
    pairs = common.write_pairs(common.make_pairs(tok, 2 * args.micro_batch * STEPS, **lengths), work / "pairs.jsonl")
    cfg = config(args, lengths)
    cache = work / "reference.pt"
    train.reference_logps(mdir, pairs, cache, max_length=cfg["max_length"], max_prompt_length=cfg["max_prompt_length"],
                          batch_size=args.micro_batch, dtype=cfg["precision"])
    spec = {"work": str(work), "model_dir": str(mdir), "pairs": str(pairs), "cache": str(cache), "cfg": cfg,
            "device": args.device}
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    clean = _run(spec, "clean", interrupt=False)
    resumed = _run(spec, "resumed", interrupt=True)
    a = load_model(work / "clean" / "model")  # the final saves load with from_pretrained (or this raises)
    b = load_model(work / "resumed" / "model")
    max_diff = max(float((x - y).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    items, _ = train.tokenize_pairs(tok, [json.loads(l) for l in Path(pairs).read_text().splitlines()],
                                    max_length=cfg["max_length"], max_prompt_length=cfg["max_prompt_length"])
    # every pair is seen once in the STEPS steps; a pair's tokens: its prompt once and both responses
    tokens_per_step = sum(len(i["prompt"]) + len(i["chosen"]) + len(i["rejected"]) for i in items) / STEPS
    res = {"machine": common.finish(common.machine(args.device)), "shape": args.shape or ("tiny" if args.smoke else None),
           "config": cfg, "clean": clean, "resumed": resumed,
           "resumed_from_step_ok": resumed["resumed_from_step"] == INTERRUPT_AT - INTERRUPT_AT % EVERY,
           "max_abs_weight_diff_resumed_vs_clean": max_diff,
           "tokens_per_s": round(tokens_per_step / clean["median_step_s"], 1) if clean["median_step_s"] else None,
           "peak_mib": round(common.peak_memory_mib(args.device), 1)}
    path = common.write_json(common.out_path(args, NAME), res)
    print(json.dumps({k: v for k, v in res.items() if k not in ("machine", "config")}, indent=2))
    print(f"wrote {path}")
    return 0 if res["resumed_from_step_ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
