"""The start-up check (eval/preflight.py, the Snakefile's onstart): a run that will need an API key, a
judge model or MT-Bench's files it does not have fails in seconds, before any job, naming the config key
and the fix; a dry run only warns.

Run: pytest tests/test_preflight.py -q     (about 20 s: two Snakemake start-ups)
"""
from __future__ import annotations

import copy
import sys

import pytest
import yaml
from snakemake.utils import validate

from eval import preflight
from test_workflow import REPO, snakemake, tiny_config

SCHEMA = str(REPO / "workflow/schemas/config.schema.yaml")
OPENAI = {"kind": "openai", "model": "judge-x", "base_url": "http://127.0.0.1:9/v1",
          "api_key_env": "RPO_TEST_PREFLIGHT_KEY"}


def resolved(**over) -> dict:
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    validate(cfg, SCHEMA, set_default=True)
    return cfg


def test_the_judges_a_run_uses():
    cfg = resolved()
    # the quickstart: Table 1's gold judge and the benchmarks' shared llama.cpp judge
    assert [k for k, _ in preflight.used_judges(cfg)] == ["table1.judge", "benchmarks.judge"]
    cfg = copy.deepcopy(cfg)
    cfg["benchmarks"]["alpacaeval"]["judge"] = dict(OPENAI)
    cfg["benchmarks"]["mtbench"]["enabled"] = False
    # MT-Bench off; AlpacaEval's own judge, Arena-Hard's the shared one
    assert [k for k, _ in preflight.used_judges(cfg)] == ["table1.judge", "benchmarks.alpacaeval.judge",
                                                         "benchmarks.judge"]


def test_judge_validity_adds_its_judge_constrained():
    cfg = resolved(judge_validity={"enabled": True})
    # its own judge is null: benchmarks.judge, checked as it is asked with constrain: true
    assert preflight.used_judges(cfg)[-1] == ("judge_validity.judge", {**cfg["benchmarks"]["judge"], "constrain": True})
    gpt4 = {"kind": "openai", "model": "gpt-4-0613", "base_url": "https://api.openai.com/v1"}
    cfg = resolved(judge_validity={"enabled": True, "judge": gpt4})
    problems = preflight.check(cfg, dryrun=True)
    assert len(problems) == 1 and problems[0].startswith("judge_validity.judge.constrain: true is refused")
    assert preflight.check(resolved(judge_validity={"enabled": True, "judge": gpt4, "constrain": [False]})) == []


def test_a_missing_key_fails_naming_the_variable_and_the_config_key(monkeypatch):
    cfg = resolved(table1={"judge": dict(OPENAI)})
    monkeypatch.delenv("RPO_TEST_PREFLIGHT_KEY", raising=False)
    with pytest.raises(preflight.PreflightError, match=r"table1\.judge: .*\$RPO_TEST_PREFLIGHT_KEY, which is not set"):
        preflight.check(cfg)
    assert len(preflight.check(cfg, dryrun=True)) == 1  # a dry run: the same problem, only logged
    monkeypatch.setenv("RPO_TEST_PREFLIGHT_KEY", "sk-test")
    assert preflight.check(cfg) == []


def test_a_llamacpp_judge_without_its_model_fails():
    cfg = resolved(benchmarks={"judge": {"kind": "llamacpp", "model": "/nonexistent/judge.gguf"}})
    problems = preflight.check(cfg, dryrun=True)
    assert len(problems) == 1 and problems[0].startswith("benchmarks.judge.model: ")
    assert "/nonexistent/judge.gguf" in problems[0]


def test_vllm_backend_without_vllm_fails_naming_the_key(monkeypatch):
    from helpers import fake_vllm
    cfg = resolved(generation={"backend": "vllm"})
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed, whatever this machine has
    with pytest.raises(preflight.PreflightError, match=r"generation\.backend: vllm needs the vllm package"):
        preflight.check(cfg)
    assert preflight.backend_problems(resolved()) == []  # hf needs no vllm
    fake_vllm.install(monkeypatch)  # installed: no problem
    assert preflight.backend_problems(cfg) == []


def test_the_workflow_stops_before_any_job(tmp_path, monkeypatch):
    monkeypatch.delenv("RPO_TEST_PREFLIGHT_KEY", raising=False)
    cfg = yaml.safe_load(tiny_config(tmp_path).read_text())
    cfg["table1"]["judge"] = dict(OPENAI)
    path = tmp_path / "needs-a-key.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert snakemake(tmp_path, path, "-n").returncode == 0  # planning needs no key
    run = snakemake(tmp_path, path)
    assert run.returncode != 0
    assert "$RPO_TEST_PREFLIGHT_KEY, which is not set" in run.stdout + run.stderr
    assert not (tmp_path / "results" / "models").exists()  # nothing ran: not even the base model
