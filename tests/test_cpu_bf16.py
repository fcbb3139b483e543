"""benchmarks.cpu_bf16 and the CPU bf16 check: the comparison on hand-made runs, the bf16 flag read from hand-made
/proc/cpuinfo files, the matmul measurement, and (slow) the real two-precision smoke run.

    pytest tests/test_cpu_bf16.py
"""
from __future__ import annotations

import json
import subprocess
import sys

import logging

import pytest

from benchmarks import common, cpu_bf16
from rpo import train

# two processors' lines of /proc/cpuinfo, trimmed to the keys the check reads
ZEN3 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


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


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    (tmp_path / "zen3").write_text(ZEN3)
    (tmp_path / "spr").write_text(SAPPHIRE)
    (tmp_path / "avx512_only").write_text("flags\t: avx2 avx512f avx512bw\n")  # avx512 without its bf16 extension
    assert train.cpu_has_native_bf16(tmp_path / "zen3") is False
    assert train.cpu_has_native_bf16(tmp_path / "spr") is True
    assert train.cpu_has_native_bf16(tmp_path / "avx512_only") is False
    assert train.cpu_has_native_bf16(tmp_path / "missing") is None  # not Linux: unknown, no warning
    (tmp_path / "neoverse").write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")  # Arm's key
    (tmp_path / "a72").write_text("processor\t: 0\nFeatures\t: fp asimd crc32\n")
    (tmp_path / "noflags").write_text("processor\t: 0\nmodel name\t: something\n")
    assert train.cpu_has_native_bf16(tmp_path / "neoverse") is True
    assert train.cpu_has_native_bf16(tmp_path / "a72") is False
    assert train.cpu_has_native_bf16(tmp_path / "noflags") is None  # no flags listed: no claim either way


@pytest.mark.parametrize("native, dtype, device, warns", [
    (False, "bfloat16", "cpu", True),     # emulated bf16: the run would be many times slower
    (True, "bfloat16", "cpu", False),
    (None, "bfloat16", "cpu", False),     # unknown CPU: no claim either way
    (False, "float32", "cpu", False),
    (False, "bfloat16", "cuda", False),   # a GPU's bf16 is native; the CPU flags do not matter
])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(monkeypatch, caplog, native, dtype, device, warns):
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: native)
    with caplog.at_level(logging.WARNING, logger="rpo.train"):
        assert train.check_precision(dtype, device) is warns
    assert ("emulates bf16" in caplog.text) is warns


def test_matmul_measures_both_dtypes(tmp_path):
    out = tmp_path / "mm.json"
    assert cpu_bf16.main(["--matmul", "--matmul-seconds", "0.01", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    fp32, bf16 = res["rows"]
    assert (fp32["dtype"], bf16["dtype"]) == ("float32", "bfloat16") and fp32["vs_fp32"] == 1.0
    assert fp32["gflops"] > 0 and bf16["gflops"] > 0
    assert bf16["vs_fp32"] == pytest.approx(bf16["gflops"] / fp32["gflops"])
    assert res["machine"]["cpu_native_bf16"] == train.cpu_has_native_bf16()
    assert fp32["threads"] == bf16["threads"] == 1  # --threads 1 (the default) was applied
