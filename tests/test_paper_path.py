"""The paper path in miniature (issue 22): config/paper-beta.yaml's own settings through the whole DAG on a CPU,
as a researcher with a cluster would start it, and the preflight catching, before any job, each of the failures
that a paper-scale run met only after work had started.

The test writes a hub cache (HF_HUB_OFFLINE=1) holding a tiny random 2-layer Llama with the zephyr chat template
under the beta series' model id, UltraFeedback-shaped pairs under its dataset id, Arena-Hard v0.1's files and a
df_gamed.csv stand-in (tests/helpers/paper_path.py), runs a fake OpenAI-compatible judge on loopback
(tests/helpers/fake_openai.py) and runs .test/config/paper-beta.yaml, which extends the real paper config and
overrides only the judge URL, sizes, 2 training ranks and the harness task.

Run: pytest -q -m slow tests/test_paper_path.py      (about 5 minutes on 2 CPU cores)
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import paper_path
from helpers.fake_openai import FakeOpenAIServer

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-paper-path-test"
JUDGE_MODELS = ["gpt-4", "gpt-4-0613", "gpt-4-1106-preview"]  # the paper configs' judges

pytestmark = [pytest.mark.workflow, pytest.mark.slow]


def config(tmp: Path, url: str, **changes) -> Path:
    """.test/config/paper-beta.yaml with the fake judge's URL, and `changes` (key path -> value) on top."""
    cfg = yaml.safe_load((REPO / ".test/config/paper-beta.yaml").read_text())
    for block in (cfg["table1"]["judge"], cfg["benchmarks"]["judge"], cfg["benchmarks"]["alpacaeval"]["judge"],
                  cfg["benchmarks"]["arenahard"]["judge"]):
        block["base_url"] = url
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp / "paper-beta-mini.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snakemake(tmp: Path, configfile: Path, hub: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_CACHE": str(hub),
           "HF_DATASETS_CACHE": str(tmp / "datasets-cache"), "OPENAI_API_KEY": KEY,
           "ACCELERATE_USE_CPU": "true",  # the 2 training ranks on a CPU: gloo
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp),
           "--configfile", str(configfile), "--cores", "2", *extra, "results/table1.csv"]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=1800)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return paper_path.write_hub(tmp_path_factory.mktemp("paper-hub"))


@pytest.fixture(scope="module")
def judge():
    with FakeOpenAIServer(models=JUDGE_MODELS) as server:
        yield server


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory, hub, judge):
    tmp = tmp_path_factory.mktemp("paper-run")
    run = snakemake(tmp, config(tmp, judge.url), hub)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return tmp, run


def test_the_data_are_the_authors(paper_run):
    tmp, _ = paper_run
    summary = json.loads((tmp / "results/data/summary.json").read_text())
    # run_rpo.py's HumanEval filter removed the pair that quotes a HumanEval docstring (required: from the hub cache)
    assert summary["humaneval_decontamination"]["applied"] is True, summary["humaneval_decontamination"]
    train = [json.loads(line) for line in (tmp / "results/data/train.jsonl").read_text().splitlines()]
    assert len(train) == paper_path.N_TRAIN - 1
    assert f"uf{paper_path.CONTAMINATED}" not in {r["id"] for r in train}
    s = json.loads((tmp / "results/train/rpo/train_summary.json").read_text())
    assert s["tokenization"]["chat_format"] == "authors"  # the handbook's text, TRL 0.11's token boundaries


def test_training_ran_sharded_on_two_ranks(paper_run):
    tmp, run = paper_run
    for method in ("dpo", "rpo"):
        s = json.loads((tmp / f"results/train/{method}/train_summary.json").read_text())
        # the paper configs' FSDP2 full sharding, on the 2 processes accelerate started
        assert (s["world_size"], s["sharding"], s["finetuning"]) == (2, "full", "full"), s
        # bf16 run: the policy is saved in bf16 from the fp32 master weights, and loads
        assert s["saved"]["kind"] == "full" and s["saved"]["dtype"] == "bfloat16"
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(tmp / f"results/train/{method}/model", dtype="auto")
        assert str(model.dtype) == "torch.bfloat16"
    assert "rpo preflight: nothing missing" in run.stderr


def test_table1_used_the_paper_protocol_and_table2_is_filled(paper_run, judge):
    tmp, _ = paper_run
    rows = list(csv.DictReader((tmp / "results/table1.csv").open()))
    wr = [r for r in rows if r["metric"] == "win_rate"]
    assert len(wr) == 6 and all(r["judge"] == "openai:gpt-4" and r["value"] != "" for r in wr)
    for path in (tmp / "results/judgments/table1").glob("*.jsonl"):
        assert {json.loads(line)["protocol"] for line in path.read_text().splitlines()} == {"paper"}
    bench = {(r["model_a"], r["metric"]): r for r in rows if r["metric"] != "win_rate"}
    for model in ("ref", "dpo", "rpo"):
        for metric in ("mtbench", "alpacaeval_wr", "alpacaeval_lc", "arenahard"):
            assert bench[(model, metric)]["value"] != "", (model, metric)  # LC too: all 805, df_gamed.csv cached
        assert bench[(model, "arenahard")]["model_b"] == "gpt-4-0314"  # v0.1, from the hub cache
    comparison = list(csv.DictReader((tmp / "results/paper_comparison.csv").open()))
    assert {r["source"] for r in comparison} == {"Table 1", "Table 2"}
    assert all(r["value"] != "" for r in comparison if r["model_a"] in ("rpo", "ref", "dpo"))
    # every judge call went to the configured URL with the key from the environment
    assert {h["Authorization"] for h in judge.headers} == {f"Bearer {KEY}"}
    assert set(judge.kinds()) == {"pairwise", "mtbench", "alpacaeval", "arenahard"}
    md = (tmp / "results/table1.md").read_text()
    assert "## Judge calls" in md and "| table1 | RPO vs Ref | openai:gpt-4 |" in md


# ---------------------------------------------------------------------------------------------------
# Each failure a paper-scale run met after work had started, now caught up front when its fix is removed:
# the run stops in its preflight, naming the key, and no job runs.
# ---------------------------------------------------------------------------------------------------

def stops_before_any_job(tmp: Path, run: subprocess.CompletedProcess, *expected: str) -> None:
    assert run.returncode != 0, run.stderr[-3000:]
    err = run.stderr
    assert "this run cannot finish" in err, err[-3000:]
    for text in expected:
        assert text in err, (text, err[-3000:])
    assert not (tmp / "results").exists() or not any((tmp / "results").iterdir()), list((tmp / "results").rglob("*"))


def hub_without(hub: Path, tmp: Path, repo_dir: str) -> Path:
    """A copy of the hub cache without one repository."""
    copy = tmp / "hub"
    shutil.copytree(hub, copy, ignore=lambda d, names: [n for n in names if n == repo_dir])
    return copy


def test_an_unreachable_judge_stops_the_run_in_seconds(tmp_path, hub, judge):
    run = snakemake(tmp_path, config(tmp_path, "http://127.0.0.1:9/v1"), hub)
    stops_before_any_job(tmp_path, run, "table1.judge: http://127.0.0.1:9/v1 is not reachable")


def test_arena_hard_v2_without_a_category_stops_the_run(tmp_path, hub, judge):
    run = snakemake(tmp_path, config(tmp_path, judge.url, **{"benchmarks.arenahard.version": "v2.0"}), hub)
    stops_before_any_job(tmp_path, run, "benchmarks.arenahard.category: Arena-Hard v2.0 scores each category")


def test_arena_hard_v01_files_missing_from_the_cache_stop_the_run(tmp_path, hub, judge):
    bare = hub_without(hub, tmp_path, "datasets--lmarena-ai--arena-hard-auto")
    run = snakemake(tmp_path, config(tmp_path, judge.url), bare)
    stops_before_any_job(tmp_path, run, "benchmarks.arenahard.version 'v0.1' reads data/arena-hard-v0.1/question.jsonl")


def test_harness_tasks_that_cannot_run_stop_the_run(tmp_path, hub, judge):
    # the paper config's own hub tasks, whose datasets are not in the cache offline
    hub_tasks = yaml.safe_load((REPO / "config/paper-common.yaml").read_text())["lm_eval"]["tasks"]
    run = snakemake(tmp_path, config(tmp_path, judge.url, **{"lm_eval.tasks": hub_tasks}), hub)
    stops_before_any_job(tmp_path, run, "lm_eval.tasks[0] (ifeval): the hub dataset 'google/IFEval' is not in the hub cache",
                         "lm_eval.tasks[6] (mmlu): the hub dataset 'cais/mmlu'")
    # the offline held-out IFEval task with UltraFeedback-shaped data
    run = snakemake(tmp_path, config(tmp_path, judge.url, **{"lm_eval.tasks": [{"name": "ifeval_heldout"}]}), hub)
    stops_before_any_job(tmp_path, run, "lm_eval.tasks[0]: 'ifeval_heldout' evaluates the held-out prompts by their "
                                        "IFEval key")


def test_the_lc_file_is_checked_at_the_start_and_planning_stays_offline(tmp_path, hub, judge):
    bare = hub_without(hub, tmp_path, "datasets--tatsu-lab--alpaca_eval")
    dry = snakemake(tmp_path, config(tmp_path, judge.url), bare, "-n")
    assert dry.returncode == 0, dry.stderr[-3000:]  # parsing fetches nothing
    assert "rpo preflight (dry run, not fatal): benchmarks.alpacaeval.lc_win_rate is 'required'" in dry.stderr
    run = snakemake(tmp_path, config(tmp_path, judge.url), bare)
    stops_before_any_job(tmp_path, run, "benchmarks.alpacaeval.lc_win_rate is 'required' but the LC win rate cannot "
                                        "be computed", "df_gamed.csv")
