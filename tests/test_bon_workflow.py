"""The best-of-n target end to end on the tiny config (issue 26): `snakemake results/bon.csv` trains the proxy
reward models, samples the reference, scores every sample by every member and by the gold, and writes the
tidy CSV and the figure; a second run has nothing to do. Then (slow) kill -9 of a reward-model training job
and of the sampling job: each re-run resumes (from the checkpoint, from the .partial file) and redoes
nothing that had finished.

Then RSO as a method on the same run: its rejection-sampled pairs, its training, its Table 1 judgment.

Every test here runs Snakemake for more than a minute, so all are slow:
    pytest tests/test_bon_workflow.py -q -m slow     (about 10 minutes on 2 shared CPU cores)
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers.workflow import REPO, snakemake, tiny_config

pytestmark = [pytest.mark.workflow, pytest.mark.slow]


@pytest.fixture(scope="module")
def bon_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bon")
    config = tiny_config(tmp)
    run = snakemake(tmp, config, target="results/bon.csv")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return tmp, config


def test_bon_csv_figure_and_members(bon_run):
    tmp, _ = bon_run
    cfg = yaml.safe_load((REPO / ".test/config/config.yaml").read_text())
    seeds, big_n = cfg["reward_models"]["seeds"], cfg["best_of_n"]["n_samples"]
    rows = list(csv.DictReader((tmp / "results/bon.csv").open()))
    assert tuple(rows[0]) == ("objective", "member", "n", "kl_bon", "metric", "value", "ci_low", "ci_high",
                              "n_prompts", "seed")
    ns = sorted({int(r["n"]) for r in rows})
    assert ns == [1, 2, 4, big_n]
    keys = {(r["objective"], r["member"]) for r in rows}
    assert keys == {*(("single", f"rm-seed{s}") for s in seeds), ("single", "members"),
                    ("mean", "ensemble"), ("wco", "ensemble"), ("uwo", "ensemble")}
    assert len(rows) == len(keys) * len(ns) * 3  # proxy, gold, gold_gain
    for r in rows:
        assert r["n_prompts"] == "4" and r["seed"] == "0"  # the 4 held-out prompts; best_of_n.seed
        assert float(r["ci_low"]) <= float(r["value"]) <= float(r["ci_high"])
        if r["metric"] == "gold":
            assert 0 <= float(r["value"]) <= 1
    # n = 1 picks a sample at random, whatever the objective: every gold curve starts at the samples' mean gold
    gold = [json.loads(line)["gold"] for line in (tmp / "results/bon/gold.jsonl").read_text().splitlines()]
    mean_gold = sum(sum(g) / len(g) for g in gold) / len(gold)
    for r in rows:
        if r["metric"] == "gold" and r["n"] == "1":
            assert float(r["value"]) == pytest.approx(mean_gold, abs=1e-5)
    samples = [json.loads(line) for line in (tmp / "results/bon/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(len(s["responses"]) == big_n for s in samples)
    assert (tmp / "results/figures/bon.png").read_bytes()[:4] == b"\x89PNG"
    for s in seeds:
        summary = json.loads((tmp / f"results/reward_models/seed{s}/train_summary.json").read_text())
        assert summary["config"]["seed"] == s and summary["heldout"]["pairs"] == 4
        # LoRA on the top layer: the member started from the reference pass's trunk
        assert summary["trunk"]["layer"] == 1 and summary["trunk"]["layer_calls_skipped"] == summary["steps"]
        assert (tmp / f"results/reward_models/seed{s}/model/reward_model.json").is_file()
    assert not list((tmp / "results/checkpoints").glob("reward_model_seed*"))  # removed once finished


def test_second_bon_run_does_nothing(bon_run):
    tmp, config = bon_run
    run = snakemake(tmp, config, "-n", target="results/bon.csv")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Nothing to be done" in run.stdout + run.stderr


# ---------------------------------------------------------------------------------------------------
# kill -9 of a job, then the same command again
# ---------------------------------------------------------------------------------------------------

def _job_pid(tmp: Path, command: str) -> int | None:
    """The pid of the `python -m rpo <command>` job that Snakemake started in `tmp`, if it runs."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if b"-m" in args and command.encode() in args and Path(os.readlink(proc / "cwd")) == tmp:
                return int(proc.name)
        except OSError:
            continue
    return None


def _run_and_kill(tmp: Path, config: Path, target: str, command: str, ready,
                  timeout: float = 300) -> subprocess.CompletedProcess:
    """Run Snakemake for `target` and SIGKILL its `command` job (as the out-of-memory killer would) once
    `ready()`; returns Snakemake's result, which then fails on that job."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp),
           "--configfile", str(config), "--cores", "1", target]
    with subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        deadline = time.monotonic() + timeout
        pid = None
        while pid is None:
            assert proc.poll() is None, f"Snakemake ended before {command} could be killed"
            assert time.monotonic() < deadline, f"{command} was not ready to be killed within {timeout} s"
            if ready():
                pid = _job_pid(tmp, command)
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _answered(partial: Path) -> int:
    if not partial.is_file():
        return 0
    n = 0
    for line in partial.read_text().splitlines():
        try:
            n += "responses" in json.loads(line)
        except json.JSONDecodeError:
            pass
    return n


def _mtimes(tmp: Path) -> dict[str, float]:
    return {str(p.relative_to(tmp)): p.stat().st_mtime for p in (tmp / "results").rglob("*")
            if p.is_file() and "checkpoints" not in p.parts and not p.name.endswith(".partial")}


def test_kill9_of_training_and_sampling_resumes_and_redoes_nothing_finished(tmp_path):
    config = tiny_config(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    # long enough to be caught: 60 epochs of 2 steps per member, checkpoints every 2 steps; 48-token samples,
    # one prompt per batch
    cfg["reward_models"]["training"] = {"epochs": 60}
    cfg["best_of_n"].update({"max_new_tokens": 48, "batch_size": 1})
    config.write_text(yaml.safe_dump(cfg))
    ckpt = tmp_path / "results/checkpoints/reward_model_seed1"
    partial = tmp_path / "results/bon/samples.jsonl.partial"
    # first a member's training (and what it needs), then the sampling: each killed in its run
    for target, command, ready in (
            ("results/reward_models/seed1/model", "train-reward-model", lambda: any(ckpt.glob("step-*[0-9]"))),
            ("results/bon/samples.jsonl", "sample-candidates", lambda: _answered(partial) >= 1)):
        before = _mtimes(tmp_path)
        run = _run_and_kill(tmp_path, config, target, command, ready)
        assert run.returncode != 0, run.stdout[-3000:]
        after = _mtimes(tmp_path)
        assert {k: after.get(k) for k in before} == before  # what had finished was not made again
    assert any(ckpt.glob("step-*[0-9]")) and _answered(partial) >= 1  # what each kill left behind
    cut_at = max(int(p.name.removeprefix("step-")) for p in ckpt.glob("step-*[0-9]"))
    done_samples = _answered(partial)
    before = _mtimes(tmp_path)
    final = snakemake(tmp_path, config, target="results/bon.csv")
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-6000:]
    after = _mtimes(tmp_path)
    assert {k: after.get(k) for k in before} == before
    summary = json.loads((tmp_path / "results/reward_models/seed1/train_summary.json").read_text())
    assert summary["resumed_from_step"] == cut_at > 0 and summary["steps"] == 120
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "results/reward_models/seed1/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 121))
    log = (tmp_path / "logs/sample_bon/samples.log").read_text()
    assert f"resuming, {done_samples} of 4 answers already done" in log
    assert (tmp_path / "results/bon.csv").is_file()


# ---------------------------------------------------------------------------------------------------
# RSO: a method with `sampling`, on the same run
# ---------------------------------------------------------------------------------------------------

def test_rso_method_trains_on_its_rejection_sampled_pairs_and_is_judged(bon_run):
    tmp, config = bon_run
    cfg = yaml.safe_load(config.read_text())
    # the hinge loss's beta (gamma in the paper) is not the sampling's beta
    cfg["methods"]["rso"] = {"loss": "hinge", "beta": 0.05,
                             "sampling": {"n_candidates": 6, "m_accepted": 4, "beta": 0.5, "reward": "mean",
                                          "labeller": "reward", "max_new_tokens": 6, "batch_size": 4}}
    for b in ("mtbench", "alpacaeval", "arenahard"):
        cfg["benchmarks"][b]["enabled"] = False
    rso_config = tmp / "config-rso.yaml"
    rso_config.write_text(yaml.safe_dump(cfg))
    members = {p: p.stat().st_mtime for p in (tmp / "results/reward_models").rglob("*") if p.is_file()}
    # Table 1 compares every method with Ref (table1.all_vs_ref), RSO included
    plan = snakemake(tmp, rso_config, "-n", target="results/table1.csv")
    assert plan.returncode == 0 and "results/judgments/table1/rso_vs_ref.jsonl" in plan.stdout
    run = snakemake(tmp, rso_config, target="results/judgments/table1/rso_vs_ref.jsonl")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    summary = json.loads((tmp / "results/rso/rso/summary.json").read_text())
    assert summary["prompts"] == 8 and summary["candidates"] == 48 and summary["pairs"] >= 1
    assert summary["accepted"] <= 8 * 4 and summary["reward"] == "mean"
    pairs = [json.loads(line) for line in (tmp / "results/rso/rso/train.jsonl").read_text().splitlines()]
    assert len(pairs) == summary["pairs"] and all(p["id"].split("-rso")[0].startswith("p") for p in pairs)
    assert all(p["meta"]["rso"]["chosen_reward"] > p["meta"]["rso"]["rejected_reward"] for p in pairs)
    trained = json.loads((tmp / "results/train/rso/train_summary.json").read_text())
    assert trained["method"]["beta"] == 0.05 and trained["method"]["sampling"]["beta"] == 0.5
    assert trained["tokenization"]["pairs"] == len(pairs)  # trained on RSO's pairs, not the data's 8
    assert (tmp / "results/judgments/table1/rso_vs_ref.jsonl").read_text().strip()
    # the members were reused, not retrained
    assert {p: p.stat().st_mtime for p in members} == members
