"""Fused models through the tiny `.test` workflow into results/table1.csv (issue 28): an expert trained from the
base model (`reference: base`), two fused models on the SFT reference (the dynamic search, and alpha 1: proxy
tuning), their answers, gold judgments, MT-Bench rows and Table 1 rows; a second run does nothing; a changed alpha
re-makes only that fused model and what depends on it.

To keep it in minutes the tiny config is cut to what the fused models need: one trained method on Ref (rpo), one
expert, MT-Bench as the one benchmark (the other benchmarks' rules are the same for every model; the fused model's
plan for all of them is tests/test_fusion_config.py's dry run).

Run: pytest -m slow tests/test_fusion_workflow.py -q      (6 min 47 s measured on 2 shared CPU cores, load 3 to 9)
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml
from helpers.workflow import REPO, job_counts, tiny_config

pytestmark = pytest.mark.workflow  # every test here starts Snakemake

FUSION = {"enabled": True,
          "methods": {"rpo_base": {"loss": "rpo", "beta": 0.1, "eta": 0.5, "reference": "base"}},
          "models": {"rpo_fused": {"large": "ref", "small": "base", "experts": ["rpo_base"]},
                     "rpo_proxy": {"experts": ["rpo_base"], "alpha": 1.0}},
          "pairs": [["rpo_fused", "rpo"]]}


def fusion_config(tmp, **models):
    cfg = yaml.safe_load(tiny_config(tmp).read_text())
    cfg["methods"] = {"rpo": cfg["methods"]["rpo"]}
    cfg["table1"]["pairs"] = [["rpo", "ref"]]
    cfg["figures"] = {"logps_methods": ["rpo"]}
    cfg["benchmarks"]["alpacaeval"]["enabled"] = cfg["benchmarks"]["arenahard"]["enabled"] = False
    cfg["fusion"] = json.loads(json.dumps(FUSION))
    for name, changes in models.items():
        cfg["fusion"]["models"][name].update(changes)
    path = tmp / f"config-fusion-{len(list(tmp.glob('config-fusion-*')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snakemake(tmp, configfile, *extra):
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp),
           "--configfile", str(configfile), "--cores", "2", *extra, "results/table1.csv"]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=3600)


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fusion_dag")
    config = fusion_config(tmp)
    run = snakemake(tmp, config)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return tmp, config


@pytest.mark.slow
def test_fused_models_are_rows_of_table1_and_table2(fused_run):
    tmp, _ = fused_run
    rows = list(csv.DictReader((tmp / "results/table1.csv").open()))
    wins = {(r["model_a"], r["model_b"]): r for r in rows if r["metric"] == "win_rate"}
    for pair in [("rpo_fused", "ref"), ("rpo_proxy", "ref"), ("rpo_fused", "rpo"), ("rpo_base", "ref"),
                 ("ref", "rpo_fused"), ("rpo", "rpo_fused")]:
        r = wins[pair]
        assert r["n"] == "4" and r["judge"].startswith("gold"), r
        assert 0 <= float(r["ci_low"]) <= float(r["value"]) <= float(r["ci_high"]) <= 100
    bench = {(r["model_a"], r["metric"]) for r in rows if r["metric"] != "win_rate"}
    for model in ("rpo_fused", "rpo_proxy", "rpo_base"):
        for metric in ("mtbench", "mtbench_turn1", "mtbench_turn2"):
            assert (model, metric) in bench, (model, metric)
    md = (tmp / "results/table1.md").read_text()
    assert "rpo_fused" in md and "rpo_proxy" in md
    # the fused model's parts: the SFT reference, the base model, the expert trained from the base model
    spec = json.loads((tmp / "results/models/fused/rpo_fused/fusion.json").read_text())
    assert (spec["large"]["ref_dir"], spec["small"]["ref_dir"]) == ("results/models/sft/model", "results/models/base")
    assert spec["experts"] == [{"name": "rpo_base", "ref_dir": "results/models/base",
                                "policy_dir": "results/train/rpo_base/model"}]
    assert spec["alpha"] == "dynamic" and spec["alpha_grid"] == {"max": 2.0, "step": 0.1}
    assert json.loads((tmp / "results/models/fused/rpo_proxy/fusion.json").read_text())["alpha"] == 1.0
    # the expert trained against the base model's own reference log-probs
    assert (tmp / "results/reference/base/train_logps.pt").is_file()
    summary = json.loads((tmp / "results/train/rpo_base/train_summary.json").read_text())
    assert summary["steps"] > 0
    # its answers came from the fusion backend
    log = (tmp / "logs/generate_table1/rpo_fused.log").read_text()
    assert "fused model rpo_fused = ref + α·(rpo_base − base), alpha dynamic" in log
    answers = [json.loads(line) for line in (tmp / "results/generations/table1/rpo_fused.jsonl").read_text().splitlines()]
    assert len(answers) == 4 and all(a["model"] == "rpo_fused" for a in answers)


@pytest.mark.slow
def test_second_run_does_nothing_and_alpha_reruns_only_its_model(fused_run):
    tmp, config = fused_run
    run = snakemake(tmp, config, "-n")
    assert run.returncode == 0 and "Nothing to be done" in run.stdout + run.stderr, run.stderr[-3000:]
    run = snakemake(tmp, fusion_config(tmp, rpo_proxy={"alpha": 0.5}), "-n")
    assert run.returncode == 0, run.stderr[-3000:]
    counts = job_counts(run.stdout + run.stderr)
    bench = {f"{stage}_mtbench": 1 for stage in ("generate", "judge", "score")}
    assert counts == {"make_fused_model": 1, "generate_table1": 1, "judge_table1": 1, "make_table1": 1,
                      "resolved_config": 1, **bench}, counts
