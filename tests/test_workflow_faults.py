"""Faults driven through Snakemake on a tiny config (issue 15): a data file edited in place re-runs
make_data; a gold-judged test split without the judge's instructions fails in make_data, before any
training; after kill -9 of Snakemake itself, the re-run names the exact `--unlock` command, and that
command plus the same run finish the work.

Run: pytest tests/test_workflow_faults.py -q           (about 2 minutes on 2 CPU cores)
     pytest tests/test_workflow_faults.py -q -m slow   (the kill -9 test, about a minute more)
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers.data import tiny_pairs, write_jsonl

pytestmark = pytest.mark.workflow  # every test here starts Snakemake

REPO = Path(__file__).resolve().parents[1]
TRAIN = {"learning_rate": 1e-2, "epochs": 1, "micro_batch_size": 4, "global_batch_size": 4, "max_length": 64,
         "max_prompt_length": 32, "checkpoint_every": 2, "threads": 1,
         "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}


def tiny_config(tmp: Path, model_dir: Path, *, test_rows=None) -> Path:
    write_jsonl(tiny_pairs(8), tmp / "train.jsonl")
    write_jsonl(test_rows if test_rows is not None else tiny_pairs(12)[8:], tmp / "test.jsonl")
    cfg = {"seed": 1, "base_model": {"source": str(model_dir)},
           "data": {"source": "file", "splits": {"train": str(tmp / "train.jsonl"), "test": str(tmp / "test.jsonl")}},
           "sft": {"enabled": True, "train": TRAIN}, "training": TRAIN, "reference": {"batch_size": 4, "threads": 1},
           "methods": {"dpo": {"loss": "dpo", "beta": 0.1}, "rpo": {"loss": "rpo", "beta": 0.1, "eta": 0.5}}}
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snakemake_cmd(tmp: Path, config: Path, target: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp),
            "--configfile", str(config), "--cores", "1", target]


def run(cmd: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)


def test_editing_a_file_source_reruns_make_data(tiny_model_dir, tmp_path):
    config = tiny_config(tmp_path, tiny_model_dir)
    cmd = snakemake_cmd(tmp_path, config, "results/data/train.jsonl")
    first = run(cmd, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    rows = tiny_pairs(8)
    rows[0]["chosen"][0]["content"] = "an edited chosen answer"
    time.sleep(1.1)  # a later mtime on file systems with one-second resolution
    write_jsonl(rows, tmp_path / "train.jsonl")
    second = run(cmd, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Nothing to be done" not in second.stdout + second.stderr
    kept = [json.loads(line) for line in (tmp_path / "results/data/train.jsonl").read_text().splitlines()]
    assert kept[0]["chosen"] == [{"role": "assistant", "content": "an edited chosen answer"}]


def test_gold_judge_without_instructions_fails_in_make_data(tiny_model_dir, tmp_path):
    test_rows = tiny_pairs(12)[8:]
    test_rows[2]["meta"] = {}  # the gold judge (the default table1.judge) cannot score this prompt
    config = tiny_config(tmp_path, tiny_model_dir, test_rows=test_rows)
    result = run(snakemake_cmd(tmp_path, config, "results/table1.csv"), tmp_path)
    assert result.returncode != 0
    log = (tmp_path / "logs/make_data/data.log").read_text()
    assert f"{tmp_path / 'test.jsonl'} row 2 (id 'p10'): table1.judge is gold" in log
    assert not (tmp_path / "results/models/sft").exists()  # stopped before any training


@pytest.mark.slow  # four Snakemake runs: about a minute
def test_kill9_of_snakemake_names_the_unlock_command(tiny_model_dir, tmp_path):
    config = tiny_config(tmp_path, tiny_model_dir)
    cmd = snakemake_cmd(tmp_path, config, "results/data/summary.json")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    locks = tmp_path / ".snakemake/locks"
    deadline = time.monotonic() + 120
    try:
        while not list(locks.glob("rpo-owner-*.json")):  # Snakemake holds the lock and has started
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # Snakemake and the jobs it started, as a lost session would
        proc.wait(timeout=30)
    assert list(locks.glob("*.lock"))  # the killed run's lock is left behind

    again = run(cmd, tmp_path)
    assert again.returncode != 0 and "LockException" in again.stderr
    assert f"pid {proc.pid} on" in again.stderr and "no longer running" in again.stderr
    unlock = next(line.strip() for line in again.stderr.splitlines() if line.strip().startswith("snakemake --unlock"))
    assert shlex.split(unlock) == ["snakemake", "--unlock", *cmd[3:]]  # the same arguments as the run
    unlocked = run([sys.executable, "-m", *shlex.split(unlock)], tmp_path)
    assert unlocked.returncode == 0, unlocked.stderr[-2000:]
    finished = run(cmd, tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "no longer running" not in finished.stderr
    assert (tmp_path / "results/data/summary.json").is_file() and not locks.exists()


def test_a_live_run_is_not_called_stale(tiny_model_dir, tmp_path):
    """While a run holds the lock, a second run gets Snakemake's own LockException and no --unlock advice."""
    config = tiny_config(tmp_path, tiny_model_dir)
    cmd = snakemake_cmd(tmp_path, config, "results/data/summary.json")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    locks = tmp_path / ".snakemake/locks"
    deadline = time.monotonic() + 120
    try:
        while not list(locks.glob("rpo-owner-*.json")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGSTOP)  # hold it still (and alive) while the second run looks
        second = run(cmd, tmp_path)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert second.returncode != 0 and "LockException" in second.stderr
    assert "no longer running" not in second.stderr
