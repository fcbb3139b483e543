"""The whole DAG with every judge `kind: openai` (as the paper and single-GPU configs have them), pointed at
a fake OpenAI-compatible server on 127.0.0.1 that this test starts (tests/helpers/fake_openai.py):
tiny random model, tiny data, SFT -> DPO/RPO -> answers -> Table 1, MT-Bench, AlpacaEval and Arena-Hard
judged by that server -> results/table1.csv.

Before the judge defaults moved into the schema per kind, this run failed at judge_table1 (the schema
filled n_ctx/n_threads into every LLM judge and get_judge rejected them for `openai`), although
`snakemake -n` passed.

Run: pytest -q -m slow tests/test_workflow_openai.py      (6.5 minutes measured on 2 shared CPU cores)
"""
from __future__ import annotations

import csv
import json
import os

import pytest
import yaml
from helpers.fake_openai import FakeOpenAIServer
from helpers.workflow import snakemake, tiny_config

KEY_VAR = "RPO_WORKFLOW_JUDGE_KEY"
SECRET = "sk-workflow-test-7d1e"
LABEL = "openai:fake-judge"


pytestmark = [pytest.mark.workflow, pytest.mark.slow]


@pytest.fixture(scope="module")
def openai_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dag_openai")
    config = tiny_config(tmp)
    cfg = yaml.safe_load(config.read_text())
    with FakeOpenAIServer() as server:
        # the paper configs' judge blocks, with the fake server's URL (no n_ctx / n_threads anywhere)
        judge = {"kind": "openai", "model": "fake-judge", "base_url": server.url, "api_key_env": KEY_VAR,
                 "max_concurrency": 2}
        cfg["table1"]["judge"] = judge
        cfg["benchmarks"]["judge"] = judge
        config.write_text(yaml.safe_dump(cfg))
        os.environ[KEY_VAR] = SECRET
        try:
            run = snakemake(tmp, config)
        finally:
            del os.environ[KEY_VAR]
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
        yield tmp, server, run


def test_every_judge_ran_through_the_openai_endpoint(openai_run):
    tmp, server, _ = openai_run
    # every benchmark's judge prompt reached the server, with the key from the environment
    assert set(server.kinds()) == {"pairwise", "mtbench", "arenahard", "alpacaeval"}
    assert {h["Authorization"] for h in server.headers} == {f"Bearer {SECRET}"}
    # and no request was sent twice: tiny models often give identical answers, whose judgments then
    # come from the judge cache
    bodies = [json.dumps(r, sort_keys=True) for r in server.requests]
    assert len(bodies) == len(set(bodies))
    # every judgment is there, counted by hand from the tiny config: Table 1: 3 pairs x 4 test prompts;
    # MT-Bench: 1 question x 2 turns per model; Arena-Hard and AlpacaEval: 1 question per model
    def n_lines(pattern):
        return sorted(len(p.read_text().splitlines()) for p in tmp.glob(pattern))
    assert n_lines("results/judgments/table1/*.jsonl") == [4, 4, 4]
    assert n_lines("results/mtbench/model_judgment/*.jsonl") == [2, 2, 2]
    assert n_lines("results/arenahard/model_judgment/*.jsonl") == [1, 1, 1]
    assert [len(json.loads(p.read_text())) for p in tmp.glob("results/alpacaeval/*/annotations.json")] == [1, 1, 1]


def test_table_rows_name_the_judge_and_carry_its_verdicts(openai_run):
    tmp, _, _ = openai_run
    rows = list(csv.DictReader((tmp / "results/table1.csv").open()))
    by = {(r["model_a"], r["model_b"], r["metric"]): r for r in rows}
    for r in rows:
        assert r["judge"] == LABEL, r  # every row of the run names the same judge the same way
    for a, b in (("rpo", "ref"), ("rpo", "dpo"), ("dpo", "ref")):
        # the fake judge always says [[A]]: each prompt wins once in each order -> 0.5 -> 50 %
        assert float(by[(a, b, "win_rate")]["value"]) == 50.0 and by[(a, b, "win_rate")]["n"] == "4"
    for m in ("ref", "dpo", "rpo"):
        # MT-Bench: every judgment rated [[7]] -> 7.0 on both turns
        assert float(by[(m, "", "mtbench")]["value"]) == 7.0 and by[(m, "", "mtbench")]["n"] == "2"
        # Arena-Hard: [[A>B]] in both games; game 1 (baseline shown as A) -> 0, game 2 (model as A) -> 1
        assert float(by[(m, "o3-mini-2025-01-31", "arenahard")]["value"]) == 50.0
        # AlpacaEval: P(first shown better) = 0.7, the order is alpaca_eval's seeded switch: 30 or 70 %
        assert float(by[(m, "gpt4_1106_preview", "alpacaeval_wr")]["value"]) in (30.0, 70.0)
        assert by[(m, "gpt4_1106_preview", "alpacaeval_lc")]["value"] == ""  # offline: no GLM files


def test_judgment_files_name_the_judge_the_same_way(openai_run):
    tmp, _, _ = openai_run
    labels = set()
    for p in (tmp / "results/judgments/table1").glob("*.jsonl"):
        labels |= {json.loads(line)["judge"] for line in p.read_text().splitlines()}
    for p in (tmp / "results/arenahard/model_judgment").glob("*.jsonl"):
        labels |= {json.loads(line)["judge"] for line in p.read_text().splitlines()}
    for p in (tmp / "results/scores").rglob("*.json"):
        labels |= {r["judge"] for r in json.loads(p.read_text())}
    assert labels == {LABEL}


def test_the_key_is_in_no_result_log_or_cache(openai_run):
    tmp, _, run = openai_run
    assert SECRET not in run.stdout + run.stderr
    for d in ("results", "logs"):
        for f in (tmp / d).rglob("*"):
            if f.is_file() and f.stat().st_size < 50_000_000:
                assert SECRET.encode() not in f.read_bytes(), f
    shards = list((tmp / "results/judge_cache/fake-judge").glob("*.jsonl"))
    assert len(shards) >= 4  # one shard per judging process (the judge jobs ran as separate processes)
