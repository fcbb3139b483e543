"""bf16 autocast on the CPU against fp32 (issue 14.4): our trainer's tokens/s and its losses, same run.

    python -m benchmarks.cpu_bf16            # SmolLM2-135M, ours:dpo and ours:rpo, ~6 min on 2 cores
    python -m benchmarks.cpu_bf16 --smoke    # tiny random model, seconds
    python -m benchmarks.cpu_bf16 --matmul   # one 1408x576x1536 matmul (SmolLM2's MLP shape), fp32 vs bf16, seconds

Runs benchmarks.train_throughput twice on the same pairs, batches and initial weights, `--precision
float32` and `--precision bfloat16` (autocast over fp32 master weights; the reference pass in the same
precision, as a bf16 run computes it), and reports per variant the tokens/s of each, their ratio, and
the largest difference of the per-step losses |loss_bf16 - loss_fp32| (absolute, and relative to
max(1, |loss_fp32|)) over the steps both ran. The step-1 DPO loss is ln 2 in either precision (policy =
reference), so the later steps carry the comparison.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import common

NAME = "cpu_bf16"


MATMUL = (1408, 576, 1536)   # [tokens x hidden] @ [hidden x intermediate]: SmolLM2-135M's MLP up-projection


def matmul_gflops(dtype, *, min_s: float = 0.5, shape=MATMUL) -> float:
    """GFLOP/s of one [m x k] @ [k x n] matmul in `dtype` on this CPU: the median of 3 timings of as many calls as
    fill `min_s` seconds. Without bf16 dot-product instructions (rpo.train.CPU_BF16_FLAGS) torch emulates bf16."""
    import time

    import torch
    m, k, n = shape
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=g).to(dtype), torch.randn(k, n, generator=g).to(dtype)
    t = time.perf_counter()
    a @ b  # warm-up (the first call picks the kernel), and the time of one call
    repeats = max(1, int(min_s / (time.perf_counter() - t)))
    times = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(repeats):
            a @ b
        times.append(time.perf_counter() - t)
    return 2 * m * k * n * repeats / common.median(times) / 1e9


def run_matmul(args) -> dict:
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows = [{"dtype": str(dt).removeprefix("torch."), "threads": torch.get_num_threads(),
                 "shape": "x".join(map(str, MATMUL)), "gflops": matmul_gflops(dt, min_s=args.matmul_seconds)}
                for dt in (torch.float32, torch.bfloat16)]
    finally:
        torch.set_num_threads(before)
    for r in rows:
        r["vs_fp32"] = r["gflops"] / rows[0]["gflops"]
    return {"benchmark": f"{NAME}_matmul", "machine": common.finish(common.machine()), "rows": rows,
            "table": common.print_table(rows, ["dtype", "threads", "shape", "gflops", "vs_fp32"])}


def compare(fp32: dict, bf16: dict) -> list[dict]:
    """Per variant that ran in both: tokens/s of each and the largest per-step loss difference."""
    by = {r["variant"]: r for r in bf16["results"] if r["status"] == "ran"}
    rows = []
    for r in fp32["results"]:
        if r["status"] != "ran" or r["variant"] not in by:
            continue
        b = by[r["variant"]]
        pairs = list(zip(r["losses"], b["losses"]))
        diffs = [abs(y - x) for x, y in pairs]
        rel = [abs(y - x) / max(1.0, abs(x)) for x, y in pairs]
        rows.append({"variant": r["variant"], "tokens_per_s_fp32": r["tokens_per_s"],
                     "tokens_per_s_bf16": b["tokens_per_s"], "speedup_bf16": b["tokens_per_s"] / r["tokens_per_s"],
                     "peak_mib_fp32": r["peak_mib"], "peak_mib_bf16": b["peak_mib"], "steps": len(pairs),
                     "max_abs_loss_diff": max(diffs), "max_rel_loss_diff": max(rel),
                     "final_loss_fp32": pairs[-1][0], "final_loss_bf16": pairs[-1][1]})
    return rows


COLUMNS = ["variant", "tokens_per_s_fp32", "tokens_per_s_bf16", "speedup_bf16", "peak_mib_fp32", "peak_mib_bf16",
           "steps", "max_abs_loss_diff", "max_rel_loss_diff", "final_loss_fp32", "final_loss_bf16"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{NAME}", description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--variants", default="ours:dpo,ours:rpo")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--matmul", action="store_true", help="only the matmul's GFLOP/s in fp32 and bf16")
    ap.add_argument("--matmul-seconds", type=float, default=0.5, help="time per timing of --matmul")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for --matmul")
    args = ap.parse_args(argv)
    if args.matmul:
        result = run_matmul(args)
        path = Path(args.out) if args.out else common.RESULTS / f"{NAME}_matmul.json"
        common.write_json(path, result)
        print(f"wrote {path}")
        return 0
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("float32", "bfloat16"):
            path = Path(tmp) / f"{precision}.json"
            cmd = [sys.executable, "-m", "benchmarks.train_throughput", "--variants", args.variants,
                   "--precision", precision, "--steps", str(args.steps), "--repeats", str(args.repeats),
                   "--out", str(path), *(["--smoke"] if args.smoke else [])]
            print("$", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, cwd=common.ROOT, check=True)
            out[precision] = json.loads(path.read_text())
    rows = compare(out["float32"], out["bfloat16"])
    if not rows:
        raise RuntimeError("no variant ran in both precisions")
    table = common.print_table(rows, COLUMNS)
    result = {"benchmark": NAME, "machine": out["bfloat16"]["machine"], "rows": rows, "table": table,
              "config": {p: out[p]["config"] for p in out}}
    path = Path(args.out) if args.out else common.RESULTS / (f"{NAME}_smoke.json" if args.smoke else f"{NAME}.json")
    common.write_json(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
