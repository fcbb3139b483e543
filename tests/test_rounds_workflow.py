"""Online rounds through Snakemake on the tiny config (issue 27): the dry run of a 3-round Table-1 method shows the
chain (round r samples from and trains from round r-1's policy; the last round is the method's model, answered and
judged for Table 1); the online study end to end on .test/config/config.yaml (results/online.csv and its figure);
adding a round runs only the new one; a change to round 2's settings re-runs rounds 2-3 only; kill -9 in round 2's
training resumes from its checkpoint.

Run: pytest tests/test_rounds_workflow.py -q              (the dry run, under a minute)
     pytest tests/test_rounds_workflow.py -q -m slow      (the study end to end and the kill -9: about 12 minutes)
"""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers.workflow import REPO, job_counts, snakemake, tiny_config

pytestmark = pytest.mark.workflow  # every test here starts Snakemake

ROUND_DIR = "results/rounds"


def dry_jobs(out: str) -> list[dict]:
    """The jobs of a dry run's printout: {"rule", "input", "output", "wildcards"}."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", out):
        m = re.match(r"(?:local)?rule (\w+):", block.strip())
        if not m:
            continue
        job = {"rule": m.group(1), "input": [], "output": [], "wildcards": {}}
        for key in ("input", "output"):
            f = re.search(rf"^\s+{key}: (.*)$", block, re.M)
            job[key] = [x.strip() for x in f.group(1).split(",")] if f else []
        w = re.search(r"^\s+wildcards: (.*)$", block, re.M)
        if w:
            job["wildcards"] = dict(kv.strip().split("=", 1) for kv in w.group(1).split(","))
        jobs.append(job)
    return jobs


def with_config(tmp: Path, name: str, edit) -> Path:
    """The tiny config with `edit(cfg)` applied, written to `tmp`/name."""
    cfg = yaml.safe_load(tiny_config(tmp).read_text())
    edit(cfg)
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_dry_run_of_a_three_round_method_shows_the_chain(tmp_path):
    def add_idpo(cfg):
        cfg["methods"]["idpo"] = {"loss": "dpo", "beta": 0.1,
                                  "rounds": {"n": 3, "samples_per_prompt": 2, "prompts_per_round": 2,
                                             "sampling": {"max_new_tokens": 6, "batch_size": 4}}}
    config = with_config(tmp_path, "idpo.yaml", add_idpo)
    run = snakemake(tmp_path, config, "-n")
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout + run.stderr
    counts = job_counts(out)
    assert {k: counts.get(k) for k in ("round_prompts", "sample_round", "label_round", "train_round", "finish_rounds")} == \
        {"round_prompts": 1, "sample_round": 3, "label_round": 3, "train_round": 3, "finish_rounds": 1}
    assert "train_preference" in counts and counts["train_preference"] == 2  # dpo and rpo only
    jobs = dry_jobs(out)
    by = {(j["rule"], j["wildcards"].get("r")): j for j in jobs if j["rule"] in ("sample_round", "train_round")}
    for r in (1, 2, 3):
        prev = f"{ROUND_DIR}/idpo/round{r - 1}/model"
        for rule in ("sample_round", "train_round"):
            job = by[(rule, str(r))]
            assert job["wildcards"]["run"] == "idpo"
            # round r samples from and trains from round r-1's policy; round 1 from the reference (Ref: the SFT model)
            assert (prev in job["input"]) == (r > 1), (rule, r, job["input"])
            assert "results/models/sft/model" in job["input"]
        assert by[("train_round", str(r))]["output"][0] == f"{ROUND_DIR}/idpo/round{r}/model"
    finish = next(j for j in jobs if j["rule"] == "finish_rounds")
    assert finish["input"][:3] == [f"{ROUND_DIR}/idpo/round{r}/model" for r in (1, 2, 3)]
    assert finish["output"][0] == "results/train/idpo/model"
    # and Table 1 answers with it and judges it against Ref like any method
    gen = [j for j in jobs if j["rule"] == "generate_table1" and j["wildcards"].get("model") == "idpo"]
    assert gen and "results/train/idpo/model" in gen[0]["input"]
    assert any(j["rule"] == "judge_table1" and "idpo" in ",".join(j["output"]) for j in jobs)


def _files(tmp: Path, run: str, r: int) -> list[Path]:
    d = tmp / ROUND_DIR / run / f"round{r}"
    return [d / f for f in ("samples.jsonl", "labels.jsonl", "selected.jsonl", "label_summary.json",
                            "metrics.jsonl", "train_summary.json", "eval.jsonl", "model/adapter_config.json")]


@pytest.mark.slow  # the study on the tiny config: about 40 Snakemake jobs, 5-6 minutes on 2 cores
def test_online_study_end_to_end_then_a_new_round_and_a_changed_round(tmp_path):
    config = tiny_config(tmp_path)
    run = snakemake(tmp_path, config, target="results/online.csv")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    rows = list(csv.DictReader((tmp_path / "results/online.csv").open()))
    assert list(rows[0]) == ["method", "loss", "hparams", "labeller", "selection", "reference", "extrapolation", "seed",
                             "round", "kl", "kl_se", "metric", "value", "ci_low", "ci_high", "n"]
    pooled = {(r["method"], r["round"], r["metric"]) for r in rows if r["seed"] == "pooled"}
    for method in ("idpo", "inpo"):
        for rnd in ("0", "1", "2"):
            for metric in ("kl", "gold_score", "gold_win_rate", "proxy_score"):
                assert (method, rnd, metric) in pooled
        seeds = {r["seed"] for r in rows if r["method"] == method}
        assert seeds == {"1", "2", "pooled"}
    for r in rows:
        assert float(r["ci_low"]) <= float(r["value"]) <= float(r["ci_high"])
        if r["round"] == "0" and r["metric"] == "kl":
            assert float(r["value"]) == 0.0  # the reference itself
    # gold labeller: the proxy is the gold score
    gold = {(r["method"], r["seed"], r["round"]): r["value"] for r in rows if r["metric"] == "gold_score"}
    proxy = {(r["method"], r["seed"], r["round"]): r["value"] for r in rows if r["metric"] == "proxy_score"}
    assert gold == proxy
    assert (tmp_path / "results/figures/online.png").read_bytes()[:4] == b"\x89PNG"
    for run_name in ("online-idpo-seed1", "online-idpo-seed2", "online-inpo-seed1", "online-inpo-seed2"):
        for rnd in (1, 2):
            for f in _files(tmp_path, run_name, rnd):
                assert f.is_file(), f
        summary = json.loads((tmp_path / ROUND_DIR / run_name / "round2/train_summary.json").read_text())
        assert summary["start_model"].endswith(f"{run_name}/round1/model") and summary["trunk_layer"] == 1
    inpo = [json.loads(x) for x in (tmp_path / ROUND_DIR / "online-inpo-seed1/round1/selected.jsonl").read_text().splitlines()]
    assert inpo and all(r["scores"][0] > r["scores"][1] for r in inpo)  # the tournament's pairs
    # the rounds' prompts are disjoint slices of the pool
    ids = [{json.loads(x)["id"] for x in (tmp_path / ROUND_DIR / "online-idpo-seed1" / f"round{r}/samples.jsonl")
            .read_text().splitlines()} for r in (1, 2)]
    assert len(ids[0]) == len(ids[1]) == 3 and not ids[0] & ids[1]
    assert not any((tmp_path / "results/checkpoints/rounds").rglob("step-*"))
    assert list((tmp_path / "logs/benchmarks/train_round").glob("*.tsv"))

    # adding a round to idpo trains only the new one (per seed), then measures it and redraws the table
    before = {f: f.stat().st_mtime_ns for rnd in (1, 2) for f in _files(tmp_path, "online-idpo-seed1", rnd)}

    def three_rounds(cfg):
        cfg["online"]["methods"]["idpo"]["rounds"]["n"] = 3
    config3 = with_config(tmp_path, "three.yaml", three_rounds)
    dry = snakemake(tmp_path, config3, "-n", target="results/online.csv")
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert job_counts(dry.stdout + dry.stderr) == {"sample_round": 2, "label_round": 2, "train_round": 2,
                                                   "evaluate_round": 2, "online": 1}
    assert all(j["wildcards"].get("r") == "3" for j in dry_jobs(dry.stdout + dry.stderr) if "r" in j["wildcards"])
    more = snakemake(tmp_path, config3, target="results/online.csv")
    assert more.returncode == 0, more.stdout[-3000:] + more.stderr[-6000:]
    assert {f: f.stat().st_mtime_ns for f in before} == before  # rounds 1-2 untouched
    assert {r["round"] for r in csv.DictReader((tmp_path / "results/online.csv").open()) if r["method"] == "idpo"} == \
        {"0", "1", "2", "3"}

    # a change to round 2's settings re-runs rounds 2 and 3 only (both seeds), and the table
    def round2_changed(cfg):
        three_rounds(cfg)
        cfg["online"]["methods"]["idpo"]["rounds"]["per_round"] = {"2": {"sampling": {"temperature": 0.7}}}
    dry = snakemake(tmp_path, with_config(tmp_path, "round2.yaml", round2_changed), "-n", target="results/online.csv")
    assert dry.returncode == 0, dry.stderr[-3000:]
    jobs = dry_jobs(dry.stdout + dry.stderr)
    assert job_counts(dry.stdout + dry.stderr) == {"sample_round": 4, "label_round": 4, "train_round": 4,
                                                   "evaluate_round": 4, "online": 1}
    assert {(j["wildcards"]["run"], j["wildcards"]["r"]) for j in jobs if "r" in j["wildcards"]} == \
        {(f"online-idpo-seed{s}", r) for s in (1, 2) for r in ("2", "3")}


@pytest.mark.slow  # round 1, then round 2 killed mid-training and resumed: about 3 minutes
def test_kill9_in_round_two_training_resumes(tmp_path):
    def long_round(cfg):
        cfg["online"]["methods"] = {"idpo": cfg["online"]["methods"]["idpo"]}
        cfg["online"]["training"] = {"epochs": 12, "checkpoint_every": 1}  # 12 steps, a checkpoint after each
    config = with_config(tmp_path, "long.yaml", long_round)
    target = f"{ROUND_DIR}/online-idpo-seed1/round2/model"
    first = snakemake(tmp_path, config, target=f"{ROUND_DIR}/online-idpo-seed1/round2/selected.jsonl")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-6000:]
    round1 = tmp_path / ROUND_DIR / "online-idpo-seed1/round1/model/adapter_model.safetensors"
    round1_mtime = round1.stat().st_mtime_ns
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path),
           "--configfile", str(config), "--cores", "1", target]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt = tmp_path / "results/checkpoints/rounds/online-idpo-seed1/round2"
    deadline = time.monotonic() + 300
    try:
        while not (ckpt / "step-000002").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, "round 2's training ended before the kill"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # Snakemake and its training job, mid-training
        proc.wait(timeout=30)
    assert not (tmp_path / target).exists()
    steps_done = sorted(p.name for p in ckpt.glob("step-*"))
    unlock = subprocess.run([*cmd[:-1], "--unlock"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert unlock.returncode == 0, unlock.stderr[-2000:]
    again = subprocess.run([*cmd, "--rerun-incomplete"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-6000:]
    log = (tmp_path / "logs/train_round/online-idpo-seed1-round2.log").read_text()
    assert re.search(r"resuming from \S+step-0000\d\d at step \d+ of 12", log), log[-2000:]
    summary = json.loads((tmp_path / ROUND_DIR / "online-idpo-seed1/round2/train_summary.json").read_text())
    assert summary["resumed_from_step"] >= 2 and f"step-{summary['resumed_from_step']:06d}" in steps_done
    steps = [json.loads(x)["step"] for x in (tmp_path / ROUND_DIR / "online-idpo-seed1/round2/metrics.jsonl")
             .read_text().splitlines()]
    assert steps == list(range(1, 13))
    assert round1.stat().st_mtime_ns == round1_mtime  # round 1 was not redone
