"""bf16 autocast on the CPU against fp32 (issue 14.4): our trainer's tokens/s and its losses, same run.

    python -m benchmarks.cpu_bf16            # SmolLM2-135M, ours:dpo and ours:rpo, ~6 min on 2 cores
    python -m benchmarks.cpu_bf16 --smoke    # tiny random model, seconds

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
    args = ap.parse_args(argv)
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
