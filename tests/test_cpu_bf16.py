"""benchmarks.cpu_bf16: the comparison on hand-made runs, and (slow) the real two-precision smoke run."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks import common, cpu_bf16


def _run(tps, losses, status="ran", variant="ours:dpo"):
    return {"variant": variant, "status": status, "tokens_per_s": tps, "peak_mib": 100.0, "losses": losses}


def test_compare_reports_speedup_and_the_largest_step_loss_difference():
    fp32 = {"results": [_run(100.0, [0.6931, 0.60, 2.5]), _run(1.0, [], status="skipped", variant="ours-flex:dpo")]}
    bf16 = {"results": [_run(150.0, [0.6931, 0.62, 2.2])]}
    (row,) = cpu_bf16.compare(fp32, bf16)
    assert row["variant"] == "ours:dpo" and row["speedup_bf16"] == 1.5 and row["steps"] == 3
    assert row["max_abs_loss_diff"] == pytest.approx(0.3)
    assert row["max_rel_loss_diff"] == pytest.approx(0.3 / 2.5)  # relative to max(1, |fp32 loss|)
    assert (row["final_loss_fp32"], row["final_loss_bf16"]) == (2.5, 2.2)


@pytest.mark.slow
def test_smoke_runs_both_precisions(tmp_path):
    out = tmp_path / "bf16.json"
    subprocess.run([sys.executable, "-m", "benchmarks.cpu_bf16", "--smoke", "--variants", "ours:dpo",
                    "--steps", "2", "--repeats", "1", "--out", str(out)], cwd=common.ROOT, check=True, timeout=600)
    res = json.loads(out.read_text())
    assert res["config"]["float32"]["precision"] == "float32"
    assert res["config"]["bfloat16"]["precision"] == "bfloat16"
    (row,) = res["rows"]
    assert row["steps"] == 3 and row["max_abs_loss_diff"] > 0  # bf16 rounds: the losses differ a little
