"""The start-up check (eval/preflight.py, the Snakefile's onstart): a run that will need an API key, a judge
endpoint, a hub model or dataset, a benchmark file, a harness dataset or a combination of settings it does not
have fails in seconds, before any job, naming the config key and the fix; a dry run only warns, offline.

Run: pytest tests/test_preflight.py -q     (about a minute: two Snakemake start-ups and the harness's task index)
"""
from __future__ import annotations

import copy
import json
import sys

import pytest
import yaml
from helpers.hub import hub_repo, write_hub_dataset, write_hub_model
from helpers.fake_openai import FakeOpenAIServer
from snakemake.utils import validate

from eval import harness, preflight
from eval.arenahard import data as arenahard
from helpers.workflow import REPO, snakemake, tiny_config

SCHEMA = str(REPO / "workflow/schemas/config.schema.yaml")
OPENAI = {"kind": "openai", "model": "judge-x", "base_url": "http://127.0.0.1:9/v1",
          "api_key_env": "RPO_TEST_PREFLIGHT_KEY"}


def resolved(**over) -> dict:
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    validate(cfg, SCHEMA, set_default=True)
    return cfg


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """An empty hub cache, offline (huggingface_hub reads its constants at import: patched in-process too)."""
    import huggingface_hub.constants as c
    cache = tmp_path / "hub"
    cache.mkdir()
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_DATASETS_CACHE": str(tmp_path / "ds")}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return cache


# ---------------------------------------------------------------------------------------------------
# judges
# ---------------------------------------------------------------------------------------------------

def test_the_judges_a_run_uses():
    cfg = resolved()
    # the quickstart: Table 1's judge is gold (no call); the benchmarks' shared llama.cpp judge
    assert [k for k, _ in preflight.used_judges(cfg)] == ["benchmarks.judge"]
    cfg = copy.deepcopy(cfg)
    cfg["table1"]["judge"] = dict(OPENAI)
    cfg["benchmarks"]["alpacaeval"]["judge"] = dict(OPENAI)
    cfg["benchmarks"]["mtbench"]["enabled"] = False
    # MT-Bench off; AlpacaEval's own judge, Arena-Hard's the shared one
    assert [k for k, _ in preflight.used_judges(cfg)] == ["table1.judge", "benchmarks.alpacaeval.judge",
                                                         "benchmarks.judge"]
    # only the judges of the jobs that will run: the overoptimization study calls none
    assert preflight.used_judges(cfg, {"study_train", "study_evaluate", "overoptimization"}) == []
    assert [k for k, _ in preflight.used_judges(cfg, {"judge_arenahard"})] == ["benchmarks.judge"]


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
    assert len(preflight.check(cfg, dryrun=True)) == 1  # a dry run: the same problem, only printed
    monkeypatch.setenv("RPO_TEST_PREFLIGHT_KEY", "sk-test")
    assert preflight.check(cfg) == []  # offline: the endpoint is not asked


def test_the_endpoint_is_asked_once_with_the_key_and_must_serve_the_model(monkeypatch):
    monkeypatch.setenv("RPO_TEST_PREFLIGHT_KEY", "sk-preflight-1")
    with FakeOpenAIServer(models=["fake", "fake-judge"]) as server:
        judge = {**OPENAI, "base_url": server.url, "model": "fake"}
        cfg = resolved(table1={"judge": judge}, benchmarks={"judge": judge})
        # table1.judge and benchmarks.judge are one endpoint and model: one probe, a GET of /models
        assert preflight.check(cfg, online=True) == []
        assert server.n == 0 and server.gets == [("/v1/models", "Bearer sk-preflight-1")]
        wrong = {**judge, "model": "gpt-5"}
        problems = preflight.check(resolved(table1={"judge": wrong}), online=True, dryrun=True)
        assert problems == [f"table1.judge: {server.url} does not serve the model 'gpt-5' (it lists: fake, fake-judge) "
                            "(judge 'gpt-5'; fix table1.judge.base_url / table1.judge.model, or start the server)"]
        server.get_status = 401
        (problem,) = preflight.check(cfg | {"benchmarks": resolved()["benchmarks"]}, online=True, dryrun=True)
        assert "rejected the request with HTTP 401: check the key in $RPO_TEST_PREFLIGHT_KEY" in problem
        assert "sk-preflight-1" not in problem
        # a server without /models: one chat completion of one token instead
        server.get_status = 404
        assert preflight.check(cfg, online=True) == []
        assert server.n == 1 and server.requests[0]["max_tokens"] == 1
    # nothing listens: found in seconds, not after the client's retries
    dead = {**judge, "base_url": "http://127.0.0.1:9/v1"}
    with pytest.raises(preflight.PreflightError, match=r"table1\.judge: http://127\.0\.0\.1:9/v1 is not reachable"):
        preflight.check(resolved(table1={"judge": dead}), online=True)


def test_a_llamacpp_judge_without_its_model_fails():
    cfg = resolved(benchmarks={"judge": {"kind": "llamacpp", "model": "/nonexistent/judge.gguf"}})
    problems = preflight.check(cfg, dryrun=True)
    assert len(problems) == 1 and problems[0].startswith("benchmarks.judge.model: ")
    assert "/nonexistent/judge.gguf" in problems[0]


# ---------------------------------------------------------------------------------------------------
# settings the scorers require
# ---------------------------------------------------------------------------------------------------

def test_settings_that_would_fail_after_judging_fail_first(tmp_path):
    cfg = resolved()
    cfg["benchmarks"]["arenahard"]["category"] = None  # v2.0 (the quickstart's version) needs a category
    cfg["benchmarks"]["alpacaeval"]["lc_win_rate"] = "required"  # with n_questions 4: the GLM needs all 805
    # UltraFeedback-shaped test rows in a file: no IFEval keys for the held-out IFEval task
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n")
    cfg["data"] = {**cfg["data"], "source": "file", "splits": {"train": str(test), "test": str(test)}}
    cfg["judge_validity"]["enabled"] = True  # gold verdicts need verifiable instructions in the test rows
    problems = preflight.settings_problems(cfg)
    # the benchmarks' own in the registry's order (eval/registry.py), then the rest
    assert [p.split(":")[0] for p in problems] == ["benchmarks.alpacaeval", "benchmarks.arenahard.category",
                                                   "lm_eval.tasks[0]", "judge_validity"]
    assert f"and row 1 of {test} (data.splits.test) has none; set judge_validity.enabled: false" in problems[3]
    assert "set category: hard_prompt, or version: v0.1" in problems[1]
    assert "n_questions is 4; set n_questions: null, or lc_win_rate: if_available" in problems[0]
    assert f"'ifeval_heldout' evaluates the held-out prompts by their IFEval key (meta.key, which data.source " \
           f"synthetic:verifiable writes), and row 1 of {test} (data.splits.test) has none; use 'ifeval_packaged'" \
           in problems[2]
    # only for the jobs that will run them
    assert preflight.settings_problems(cfg, {"make_data", "train_preference"}) == []
    # best-of-n is measured by the gold verifiers, RSO's gold labeller ranks training prompts' samples: both need
    # verifiable instructions, which these rows lack
    (bon,) = preflight.settings_problems(cfg, {"gold_bon"})
    assert bon.startswith("best_of_n: the gold verifiers score these prompts") and "data.splits.test" in bon
    (rso,) = preflight.settings_problems(cfg, {"rso_gold"})
    assert rso.startswith("methods.<rso>.sampling.labeller:") and "data.splits.train" in rso
    # the study's RSO gold: the study's own data (overoptimization.data over data)
    (study,) = preflight.settings_problems(cfg, {"study_rso_gold"})
    assert study.startswith("overoptimization.grid.<rso>.sampling:") and f"row 1 of {test} (data.splits.train)" in study
    cfg["overoptimization"]["data"] = {"source": "synthetic:verifiable"}
    assert preflight.settings_problems(cfg, {"study_rso_gold"}) == []


def test_a_stage_with_more_gpus_than_the_run_may_use_is_refused():
    cfg = resolved(resources={"training": {"gpus": 2, "nodes": 1, "mem_mb": 1000, "runtime": 10}})
    assert preflight.gpu_problems(cfg, None) == []  # no limit given (e.g. a SLURM run)
    assert preflight.gpu_problems(cfg, 2) == []
    (problem,) = preflight.gpu_problems(cfg, 1)
    assert problem.startswith("resources.training.gpus: its jobs launch 2 GPUs, but this run may use gpu=1")
    assert "--resources gpu=2" in problem


def test_vllm_backend_without_vllm_fails_naming_the_key(monkeypatch):
    from helpers import fake_vllm
    cfg = resolved(generation={"backend": "vllm"})
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed, whatever this machine has
    with pytest.raises(preflight.PreflightError, match=r"generation\.backend: vllm needs the vllm package"):
        preflight.check(cfg)
    assert preflight.backend_problems(resolved()) == []  # hf needs no vllm
    assert preflight.backend_problems(cfg, {"judge_table1"}) == []  # no job generates
    fake_vllm.install(monkeypatch)  # installed: no problem
    assert preflight.backend_problems(cfg) == []


# ---------------------------------------------------------------------------------------------------
# the hub and the benchmark files
# ---------------------------------------------------------------------------------------------------

def test_hub_models_and_data_in_the_cache_pass_offline_and_missing_ones_name_the_fix(hub, tiny_model_dir):
    cfg = resolved(base_model={"source": "hf:tiny-org/sft@v2"},
                   data={"source": "hf:tiny-org/prefs", "splits": {"train": "train", "test": "test"}})
    problems = preflight.check(cfg, rules={"materialise_base", "make_data"}, dryrun=True)
    assert problems == [
        f"base_model.source: the hub model 'tiny-org/sft' is not in the hub cache ({hub}) and the hub is not "
        "asked (offline); fill the cache on a machine with network: huggingface-cli download tiny-org/sft --revision v2",
        f"data.source: the hub dataset 'tiny-org/prefs' is not in the hub cache ({hub}) and the hub is not asked "
        "(offline); fill the cache on a machine with network: huggingface-cli download tiny-org/prefs --repo-type dataset"]
    write_hub_model(hub, "tiny-org/sft", tiny_model_dir)
    (hub / "models--tiny-org--sft" / "refs" / "v2").write_text((hub / "models--tiny-org--sft" / "refs" / "main").read_text())
    write_hub_dataset(hub, "tiny-org/prefs", {"train": [{"a": 1}], "test": [{"a": 2}]})
    assert preflight.check(cfg, rules={"materialise_base", "make_data"}) == []
    # a file source: its files exist
    cfg = resolved(data={"source": "file", "splits": {"train": "/nonexistent/train.jsonl", "test": __file__}})
    assert preflight.check(cfg, rules={"make_data"}, dryrun=True) == [
        "data.splits.train: no file '/nonexistent/train.jsonl'"]


def _arena_v01_cache(hub):
    snap = hub_repo(hub, "dataset", arenahard.HUB_REPO)
    (snap / "data/arena-hard-v0.1/model_answer").mkdir(parents=True)
    (snap / arenahard.HUB_V01_QUESTIONS).write_text("".join(
        json.dumps({"question_id": f"q{i}", "category": "arena-hard-v0.1", "turns": [{"content": f"p{i}"}]}) + "\n"
        for i in range(arenahard.V01_N_QUESTIONS)))
    (snap / arenahard.HUB_V01_BASELINE).write_text("".join(
        json.dumps({"question_id": f"q{i}", "model_id": "gpt-4-0314",
                    "choices": [{"index": 0, "turns": [{"content": f"a{i}"}]}]}) + "\n"
        for i in range(arenahard.V01_N_QUESTIONS)))


def test_arena_hard_v01_comes_from_the_cache_and_is_refused_up_front_without_it(hub):
    cfg = resolved(benchmarks={"arenahard": {"version": "v0.1", "category": None}})
    rules = {"generate_arenahard"}
    (problem,) = preflight.check(cfg, rules=rules, dryrun=True)
    assert problem.startswith("benchmarks.arenahard.version 'v0.1' reads data/arena-hard-v0.1/question.jsonl of "
                              "the HF dataset lmarena-ai/arena-hard-auto, which is not in the hub cache")
    assert "huggingface-cli download lmarena-ai/arena-hard-auto" in problem and "version: v2.0" in problem
    _arena_v01_cache(hub)
    assert preflight.check(cfg, rules=rules) == []
    questions, baselines = arenahard.load_benchmark("v0.1")  # the job then reads the cache, offline
    assert len(questions) == 500 and baselines["gpt-4-0314"]["q3"] == "a3"


def test_the_lc_file_is_checked_at_the_start_not_while_parsing(hub):
    cfg = resolved(benchmarks={"alpacaeval": {"lc_win_rate": "required", "n_questions": None}})
    (problem,) = preflight.check(cfg, rules={"score_alpacaeval"}, dryrun=True)
    assert "lc_win_rate is 'required' but the LC win rate cannot be computed" in problem and "df_gamed.csv" in problem
    snap = hub_repo(hub, "dataset", "tatsu-lab/alpaca_eval")
    (snap / "df_gamed.csv").write_text("model,index,preference\n")
    assert preflight.check(cfg, rules={"score_alpacaeval"}) == []


def test_harness_tasks_are_resolved_to_their_datasets_without_building_them(hub):
    # groups and tags resolve to their leaf tasks' datasets; no task is built, no dataset loaded
    found = harness.task_datasets(["ifeval", "mmlu", "gsm8k"])
    assert found == {"ifeval": ["google/IFEval"], "mmlu": ["cais/mmlu"], "gsm8k": ["openai/gsm8k"]}
    cfg = resolved(lm_eval={"tasks": [{"name": "ifeval"}, {"name": "gsm8k", "num_fewshot": 5}]})
    problems = preflight.check(cfg, rules={"run_lm_eval"}, dryrun=True)
    assert [p.split(":")[0] for p in problems] == ["lm_eval.tasks[0] (ifeval)", "lm_eval.tasks[1] (gsm8k)"]
    assert "huggingface-cli download google/IFEval --repo-type dataset" in problems[0]
    write_hub_dataset(hub, "google/IFEval", {"train": [{"key": 1}]})  # as the harness's first load leaves it
    assert [p.split(":")[0] for p in preflight.check(cfg, rules={"run_lm_eval"}, dryrun=True)] == [
        "lm_eval.tasks[1] (gsm8k)"]


# ---------------------------------------------------------------------------------------------------
# in the workflow
# ---------------------------------------------------------------------------------------------------

def test_dry_run_flags():
    class W:
        from snakemake_interface_executor_plugins.settings import ExecMode
        exec_mode = ExecMode.DEFAULT
    for argv, dry in ((["-n"], True), (["-np", "--cores", "2"], True), (["--dry-run"], True), (["--dryrun"], True),
                      (["--cores", "all", "results/table1.csv"], False), (["-p", "-j", "2"], False)):
        assert preflight.dry_run_requested(W, argv) is dry, argv


@pytest.mark.workflow
def test_the_workflow_stops_before_any_job(tmp_path, monkeypatch):
    monkeypatch.delenv("RPO_TEST_PREFLIGHT_KEY", raising=False)
    cfg = yaml.safe_load(tiny_config(tmp_path).read_text())
    cfg["table1"]["judge"] = dict(OPENAI)
    path = tmp_path / "needs-a-key.yaml"
    path.write_text(yaml.safe_dump(cfg))
    dry = snakemake(tmp_path, path, "-n")
    assert dry.returncode == 0  # planning needs no key: it is a warning
    assert "rpo preflight (dry run, not fatal): table1.judge: the judge 'judge-x' reads its API key from " \
           "$RPO_TEST_PREFLIGHT_KEY" in dry.stderr
    run = snakemake(tmp_path, path)
    assert run.returncode != 0
    assert "$RPO_TEST_PREFLIGHT_KEY, which is not set" in run.stdout + run.stderr
    assert not (tmp_path / "results" / "models").exists()  # nothing ran: not even the base model
