"""The GPU measurement of train_throughput in one command: 1B- and 8B-shape Llamas (random weights, LoRA on
every layer, bf16 autocast), our three attention paths against TRL's variants, on one GPU.

    python -m benchmarks.gpu_check --out-dir results/gpu                 # one H200: both shapes
    python -m benchmarks.gpu_check --out-dir results/gpu --shapes 1b     # one shape (one call each)
    python -m benchmarks.gpu_check --out-dir /tmp/g --dry-run            # the plan only, checked, seconds
    python -m benchmarks.gpu_check --out-dir /tmp/g --smoke              # the same plan, tiny model, CPU

Each shape is one `python -m benchmarks.train_throughput --device cuda --shape <s> ...` subprocess (its
own CUDA context, so peak memory is its own), logged to `<out-dir>/<shape>.log`, writing
`<out-dir>/train_throughput_<shape>.json` and `.csv`; then `<out-dir>/summary.json` and `summary.csv`
hold, for each shape, every variant's row and each of our variants' ratio to the best TRL variant that
ran. Variants that cannot run are listed as skipped with their reason (Liger without liger-kernel
installed; FlexAttention on CPU in --smoke). Sized to take a few minutes on one H200 (not measured here:
no GPU in this session): the 8B plan is shorter (each of its processes loads 16 GB of weights) and
uses micro-batch 2. The flex runs compile their kernels (torch.compile of flex_attention) in the first
step and recompile once each for a new sequence length and a new number of packed rows, after which both
are dynamic; the plan measures after 3 warm-up steps, and `step_seconds` in the JSON shows any later
recompile.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from benchmarks import common, train_throughput

NAME = "gpu_check"
RPO = ["ours", "ours-unpacked", "ours-flex", "trl", "trl-precompute", "trl-liger", "trl-precompute-liger"]
PLAN = {
    "1b": {"variants": [f"{v}:rpo" for v in RPO], "micro_batch": 4, "steps": 4, "warmup": 3},
    "8b": {"variants": [f"{v}:rpo" for v in ("ours", "ours-flex", "trl-precompute", "trl-precompute-liger")],
           "micro_batch": 2, "steps": 3, "warmup": 3},
}


def command(shape: str, out_dir: Path, work: Path, *, smoke: bool) -> list[str]:
    """The train_throughput command line of one shape (`--smoke`: the tiny model on CPU instead)."""
    p = PLAN[shape]
    where = ["--smoke"] if smoke else ["--device", "cuda", "--shape", shape]
    return [sys.executable, "-m", "benchmarks.train_throughput", *where, "--variants", ",".join(p["variants"]),
            "--steps", str(p["steps"]), "--warmup", str(p["warmup"]), "--repeats", "1",
            "--micro-batch", str(p["micro_batch"]), "--lora-top-layers", "0",
            "--workdir", str(work / shape), "--out", str(out_dir / f"train_throughput_{shape}.json")]


def check_plan(shapes: list[str], out_dir: Path, work: Path, smoke: bool) -> list[list[str]]:
    """Every command parses with train_throughput's own argument parser (or this exits naming it)."""
    cmds = [command(s, out_dir, work, smoke=smoke) for s in shapes]
    for cmd in cmds:
        ap = train_throughput.parser()
        args = ap.parse_args(cmd[3:])
        train_throughput.parse_variants(ap, args.variants)
    return cmds


def summarise(shape: str, res: dict) -> list[dict]:
    rows = []
    for r in res["results"]:
        rows.append({"shape": shape, **{k: r.get(k) for k in train_throughput.COLUMNS + ["reason"]},
                     "step1_loss_agrees_best_trl": r.get("step1_loss_agrees_best_trl")})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", required=True, help="where the JSON, CSV and logs go")
    ap.add_argument("--shapes", default=",".join(PLAN), help=f"comma-separated, from {list(PLAN)}")
    ap.add_argument("--workdir", default=None, help="models and scratch, kept out of --out-dir (an 8B model is "
                                                    "16 GB; default /tmp/rpo_bench/gpu_check[_smoke])")
    ap.add_argument("--smoke", action="store_true", help="each shape's plan on the tiny model on CPU")
    ap.add_argument("--dry-run", action="store_true", help="check and print the plan, run nothing")
    args = ap.parse_args(argv)
    shapes = args.shapes.split(",")
    for s in shapes:
        if s not in PLAN:
            ap.error(f"unknown shape {s!r}; expected one of {list(PLAN)}")
    out_dir = Path(args.out_dir)
    work = Path(args.workdir or f"/tmp/rpo_bench/{NAME}{'_smoke' if args.smoke else ''}")
    cmds = check_plan(shapes, out_dir, work, args.smoke)
    plan = {"shapes": shapes, "smoke": args.smoke, "commands": [shlex.join(c) for c in cmds]}
    for c in plan["commands"]:
        print(c, flush=True)
    if args.dry_run:
        common.write_json(out_dir / "plan.json", plan)
        print(f"wrote {out_dir / 'plan.json'} (dry run: nothing ran)")
        return 0
    rows, per_shape, failed = [], {}, []
    for shape, cmd in zip(shapes, cmds):
        log = out_dir / f"{shape}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            rc = subprocess.run(cmd, cwd=common.ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
        out = Path(cmd[cmd.index("--out") + 1])
        if rc != 0 or not out.is_file():
            failed.append(shape)
            print(f"{shape}: FAILED (exit {rc}); last lines of {log}:\n"
                  + "\n".join(log.read_text().splitlines()[-20:]), flush=True)
            continue
        res = json.loads(out.read_text())
        rows += summarise(shape, res)
        per_shape[shape] = {"best_trl": res["best_trl"], "skipped": res["skipped"], "machine": res["machine"],
                            "tokens_per_step_equal": res["tokens_per_step_equal"]}
        print(res["table"], flush=True)
    summary = {**plan, "failed": failed, "per_shape": per_shape, "results": rows}
    common.write_json(out_dir / "summary.json", summary)
    common.write_csv(out_dir / "summary.csv", rows, ["shape", *train_throughput.COLUMNS, "reason",
                                                     "step1_loss_agrees_best_trl"])
    for r in rows:
        if r.get("best_trl"):
            print(f"{r['shape']} {r['variant']}: {r['speedup_vs_best_trl']:.3g}x the tokens/s of {r['best_trl']}, "
                  f"{r['memory_vs_best_trl']:.3g}x its peak memory, step-1 loss "
                  f"{'agrees' if r['step1_loss_agrees_best_trl'] else 'DIFFERS'}")
    print(f"wrote {out_dir / 'summary.json'} and {out_dir / 'summary.csv'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
