"""The lm-evaluation-harness stage (eval/harness.py, workflow/rules/lm_eval.smk): real harness runs on a tiny
model, the offline IFEval task against the harness's own scorer, the tidy rows, missing data, the DAG.

Run: OMP_NUM_THREADS=1 pytest -q tests/test_harness.py      (about 2 minutes on 2 CPU cores)
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.data import write_jsonl
from helpers.harness import HELDOUT, TRAIN_KEYS, ifeval_rows, make_task, pair_row, read_samples, write_split
from helpers.models import build_tiny_model, make_adapter

from eval import harness, results_table
from rpo import verifiable

REPO = Path(__file__).resolve().parents[1]
METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")


@pytest.fixture(scope="module")
def harness_runs(tmp_path_factory):
    """The stage on the tiny model, as Ref and as a LoRA policy: real simple_evaluate runs, 3 documents."""
    tmp = tmp_path_factory.mktemp("lm_eval")
    model = build_tiny_model(tmp / "tiny")
    adapter = make_adapter(model, tmp / "adapter")
    summary = make_task(tmp)
    common = {"tasks": [{"name": "ifeval_heldout", "num_fewshot": None}], "include_path": str(tmp / "task"),
              "limit": 3, "batch_size": 4, "max_gen_toks": 12, "seed": 0}
    ref = harness.run_lm_eval(model_name="ref", ref_dir=str(model), policy_dir=None, out_dir=str(tmp / "out/ref"),
                              **common)
    pol = harness.run_lm_eval(model_name="dpo", ref_dir=str(model), policy_dir=str(adapter),
                              out_dir=str(tmp / "out/dpo"), **common)
    return {"tmp": tmp, "model": model, "adapter": adapter, "summary": summary, "ref": ref, "dpo": pol}


# ---------------------------------------------------------------------------------------------------
# The offline IFEval task
# ---------------------------------------------------------------------------------------------------

def test_local_task_holds_the_heldout_prompts_and_counts_the_punkt_tab_ones(harness_runs):
    tmp, summary = harness_runs["tmp"], harness_runs["summary"]
    # 5 held-out prompts; 1174 (number_sentences) needs punkt_tab: excluded and counted
    assert summary["heldout_prompts"] == 5 and summary["evaluated_prompts"] == 4
    assert summary["excluded_unsupported_offline"] == 1 and summary["excluded_random_parameters"] == 0
    docs = [json.loads(line) for line in (tmp / "task/ifeval_heldout.jsonl").read_text().splitlines()]
    assert [d["key"] for d in docs] == [1001, 1019, 1162, 2245]  # google/IFEval's int keys, held-out order
    task = yaml.safe_load((tmp / "task/ifeval_heldout.yaml").read_text())
    # the harness's own definition, by include; only the name and the data source change
    assert task["include"] == str(harness.harness_ifeval_yaml()) and task["task"] == "ifeval_heldout"
    assert task["dataset_path"] == "json" and set(task) == {"include", "task", "dataset_path", "dataset_name",
                                                             "dataset_kwargs"}


def test_a_heldout_prompt_seen_in_training_is_an_error(tmp_path):
    prompts, _ = write_split(tmp_path)
    train = write_jsonl([pair_row(ifeval_rows()["1019"])], tmp_path / "leaky_train.jsonl")
    with pytest.raises(ValueError, match="held-out IFEval prompt 1019 is also a training prompt"):
        harness.make_ifeval_task(prompts_test=str(prompts), train=str(train), out_yaml=str(tmp_path / "t.yaml"),
                                 out_data=str(tmp_path / "t.jsonl"), out_summary=str(tmp_path / "s.json"))


def test_prompts_without_ifeval_keys_are_an_error_naming_the_row(tmp_path):
    write_jsonl([{"id": "p0", "messages": [{"role": "user", "content": "hi"}], "meta": {}}], tmp_path / "p.jsonl")
    with pytest.raises(ValueError, match=r"p.jsonl row 1 \(id 'p0'\): no meta.key"):
        harness.heldout_keys(str(tmp_path / "p.jsonl"))


def test_local_task_scores_like_the_harness_own_scorer(harness_runs):
    """Every logged sample of the run, and hand-made responses, scored by lm-eval's ifeval
    process_results on the original input_data.jsonl rows: the same four metrics."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks.ifeval import utils as ifeval_utils
    rows = ifeval_rows()
    for model in ("ref", "dpo"):
        samples = read_samples(harness_runs["tmp"] / "out" / model)
        assert len(samples) == 3
        for s in samples:
            own = ifeval_utils.process_results(rows[str(s["doc"]["key"])], [s["filtered_resps"][0]])
            assert {m: s[m] for m in METRICS} == own, s["doc"]["key"]
    tm = TaskManager(include_path=str(harness_runs["tmp"] / "task"), include_defaults=False)
    task = tm.load(["ifeval_heldout"])["tasks"]["ifeval_heldout"]
    docs = list(task.test_docs())
    assert len(docs) == 4
    for doc in docs:
        row = rows[str(doc["key"])]
        for response in ("", row["prompt"].lower(), row["prompt"].upper(), "hello world", "Hello, World"):
            assert task.process_results(doc, [response]) == ifeval_utils.process_results(row, [response])
    no_comma = next(d for d in docs if d["key"] == 1001)
    # 1001 asks for no commas: "hello world" follows it, "Hello, World" does not (hand-checked)
    assert task.process_results(no_comma, ["hello world"])["prompt_level_strict_acc"] is True
    assert task.process_results(no_comma, ["Hello, World"])["prompt_level_strict_acc"] is False
    # the gold scorer of the training data agrees (strict fraction of instructions followed)
    assert verifiable.gold_score("hello world", rows["1001"])["strict"] == 1.0


# ---------------------------------------------------------------------------------------------------
# The stage's outputs
# ---------------------------------------------------------------------------------------------------

def test_stage_writes_the_harness_own_files(harness_runs):
    tmp = harness_runs["tmp"]
    for model in ("ref", "dpo"):
        names = sorted(p.name for p in (tmp / "out" / model).iterdir())
        assert len(names) == 2 and names[0].startswith("results_") and names[1].startswith("samples_ifeval_heldout_")
        assert not (tmp / "out" / f"{model}.tmp").exists()
        results = json.loads(harness.results_file(tmp / "out" / model).read_text())
        assert results["rpo_model"] == model
        assert results["n-samples"]["ifeval_heldout"] == {"original": 4, "effective": 3}
        prompt = read_samples(tmp / "out" / model)[0]["arguments"]["gen_args_0"]["arg_0"]
        assert prompt.startswith("<|im_start|>user\n")  # the model's chat template
        assert results["chat_template"] and results["model_source"] == "hf"
    # the policy is Ref plus its adapter, passed to the harness unmerged
    ref_args, dpo_args = harness_runs["ref"]["config"]["model_args"], harness_runs["dpo"]["config"]["model_args"]
    assert "peft" not in ref_args and dpo_args["peft"] == str(harness_runs["adapter"].resolve())
    assert dpo_args["pretrained"] == ref_args["pretrained"] == str(harness_runs["model"])
    assert "peft_sha" in harness_runs["dpo"]["config"]
    ref_resps = [s["filtered_resps"][0] for s in read_samples(tmp / "out/ref")]
    assert ref_resps != [s["filtered_resps"][0] for s in read_samples(tmp / "out/dpo")]  # the adapter acts


def test_tidy_rows_from_a_real_results_file(harness_runs, tmp_path):
    tmp = harness_runs["tmp"]
    rows = harness.score_lm_eval(model_name="ref", results_dir=str(tmp / "out/ref"), out=str(tmp_path / "ref.json"))
    assert json.loads((tmp_path / "ref.json").read_text(), parse_constant=float) is not None
    samples = read_samples(tmp / "out/ref")
    by_metric = {r["metric"]: r for r in rows}
    assert sorted(by_metric) == sorted(f"lm_eval/ifeval_heldout/{m}" for m in METRICS)
    for m in ("prompt_level_strict_acc", "prompt_level_loose_acc"):
        xs = [float(s[m]) for s in samples]
        mean = sum(xs) / 3
        se = math.sqrt(sum((x - mean) ** 2 for x in xs) / 2) / math.sqrt(3)  # sample stddev / sqrt(n)
        r = by_metric[f"lm_eval/ifeval_heldout/{m}"]
        assert r["value"] == pytest.approx(mean) and r["n"] == 3 and r["judge"] == "lm-eval" and r["model_b"] == ""
        assert (r["ci_low"], r["ci_high"]) == pytest.approx((mean - 1.959964 * se, mean + 1.959964 * se), abs=1e-6)
    for m in ("inst_level_strict_acc", "inst_level_loose_acc"):
        flat = [float(x) for s in samples for x in s[m]]
        r = by_metric[f"lm_eval/ifeval_heldout/{m}"]
        assert r["value"] == pytest.approx(sum(flat) / len(flat))  # over instructions, as agg_inst_level_acc
        assert math.isnan(r["ci_low"]) and math.isnan(r["ci_high"])  # the harness reports "N/A"
    for r in rows:
        results_table.make_row(**r)  # valid table1.csv rows


def test_tidy_rows_of_filters_groups_and_missing_stderr():
    results = {  # the layout of a harness results file, values made up
        "results": {
            "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.05,
                      "exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": "N/A"},
            "mmlu": {"alias": "mmlu", "acc,none": 0.6, "acc_stderr,none": 0.01},
            "mmlu_anatomy": {"alias": " - anatomy", "acc,none": 0.5, "acc_stderr,none": 0.1}},
        "group_subtasks": {"mmlu": ["mmlu_anatomy", "mmlu_astronomy"], "gsm8k": []},
        "n-samples": {"gsm8k": {"original": 1319, "effective": 40}, "mmlu_anatomy": {"original": 135, "effective": 10},
                      "mmlu_astronomy": {"original": 152, "effective": 12}}}
    rows = {r["metric"]: r for r in harness.table_rows(results, "rpo")}
    z = 1.959964
    expected = {
        # a filter other than "none" stays in the name, as the harness's key writes it
        "lm_eval/gsm8k/exact_match,strict-match": (0.25, 0.25 - z * 0.05, 0.25 + z * 0.05, 40),
        "lm_eval/gsm8k/exact_match,flexible-extract": (0.5, math.nan, math.nan, 40),  # stderr "N/A": no interval
        "lm_eval/mmlu/acc": (0.6, 0.6 - z * 0.01, 0.6 + z * 0.01, 22),  # a group: n = 10 + 12 documents
        "lm_eval/mmlu_anatomy/acc": (0.5, 0.5 - z * 0.1, 0.5 + z * 0.1, 10),
    }
    assert sorted(rows) == sorted(expected)
    for metric, (v, lo, hi, n) in expected.items():
        r = rows[metric]
        assert r["value"] == v and r["n"] == n and r["model_a"] == "rpo"
        assert r["ci_low"] == pytest.approx(lo, abs=1e-6, nan_ok=True)
        assert r["ci_high"] == pytest.approx(hi, abs=1e-6, nan_ok=True)
    with pytest.raises(ValueError, match="mmlu.acc,none is 'oops'"):
        harness.table_rows({"results": {"mmlu": {"acc,none": "oops"}}}, "rpo")


def test_table_md_has_an_lm_eval_section():
    rows = [results_table.make_row(model_a=m, metric="lm_eval/ifeval_heldout/prompt_level_strict_acc", value=v,
                           ci_low=v - 0.1, ci_high=v + 0.1, n=8, judge="lm-eval")
            for m, v in (("ref", 0.25), ("rpo", 0.5))]
    rows.append(results_table.make_row(model_a="ref", metric="mtbench", value=5.0, n=3, judge="j"))
    md = results_table.render_markdown(rows, model_labels={"ref": "Ref", "rpo": "RPO"})
    section = md.split("## lm-evaluation-harness")[1]
    assert "| ifeval_heldout/prompt_level_strict_acc | 8 | 0.250 [0.150, 0.350] | 0.500 [0.400, 0.600] |" in section
    assert "held out from training" in section
    assert "lm_eval/" not in md.split("## Table 2")[1].split("## lm-evaluation-harness")[0]  # not in Table 2


def test_make_table1_adds_the_rows_and_the_section(harness_runs, tmp_path):
    from eval.table1 import make_table1
    tmp = harness_runs["tmp"]
    scores = []
    for m in ("ref", "dpo"):
        scores.append(str(tmp_path / f"{m}.json"))
        harness.score_lm_eval(model_name=m, results_dir=str(tmp / "out" / m), out=scores[-1])
    judgments = write_jsonl([{"id": f"p{i}", "model_a": "dpo", "model_b": "ref", "outcome": o, "judge": "gold"}
                             for i, o in enumerate([1.0, 0.0, 0.5])], tmp_path / "dpo_vs_ref.jsonl")
    make_table1(judgments=[str(judgments)], out_csv=str(tmp_path / "table1.csv"), out_md=str(tmp_path / "table1.md"),
                metrics={}, figure=str(tmp_path / "f.png"), raw_figure=str(tmp_path / "f_raw.png"),
                labels={"ref": "Ref", "dpo": "DPO"},
                pair_order=[["dpo", "ref"]], bootstrap={"n": 10, "seed": 0, "ci": 0.95}, scores=scores)
    csv_rows = [r for r in results_table.read_table(tmp_path / "table1.csv") if r["metric"].startswith("lm_eval/")]
    assert len(csv_rows) == 8 and {r["model_a"] for r in csv_rows} == {"ref", "dpo"}  # 4 metrics x 2 models
    assert all(r["judge"] == "lm-eval" and r["model_b"] == "" and r["n"] == 3 for r in csv_rows)
    assert "## lm-evaluation-harness" in (tmp_path / "table1.md").read_text()


def test_harness_model_arguments(tmp_path, tiny_model_dir):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    args = {"ref_dir": str(tiny_model_dir), "policy_dir": str(adapter), "dtype": "auto", "seed": 0}
    assert harness.harness_model(backend="hf", **args) == (
        "hf", {"pretrained": str(tiny_model_dir), "dtype": "auto", "peft": str(adapter.resolve())})
    # a fully fine-tuned policy is its own model
    assert harness.harness_model(ref_dir=str(tmp_path / "none"), policy_dir=str(tiny_model_dir), backend="hf",
                                 dtype="auto", seed=0)[1] == {"pretrained": str(tiny_model_dir), "dtype": "auto"}
    try:
        import vllm  # noqa: F401
    except ImportError:  # asked for and not installed: an error, never a silent switch to HF
        with pytest.raises(RuntimeError, match="generation backend 'vllm' needs the vllm package"):
            harness.harness_model(backend="vllm", **args)
    else:
        name, vllm_args = harness.harness_model(backend="vllm", **args)
        assert name == "vllm" and vllm_args["lora_local_path"] == str(adapter.resolve())


# ---------------------------------------------------------------------------------------------------
# Missing data
# ---------------------------------------------------------------------------------------------------

def offline_env(tmp: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp / "hf"),
            "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_a_task_whose_dataset_is_missing_fails_naming_task_and_dataset(tmp_path):
    args = {"tasks": [{"name": "hellaswag", "num_fewshot": 10}], "out": str(tmp_path / "datasets.json")}
    run = subprocess.run([sys.executable, "-m", "eval", "check-lm-eval", "--args", json.dumps(args)], cwd=tmp_path,
                         env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "TaskDataError: lm_eval task 'hellaswag': cannot load its dataset Rowan/hellaswag" in run.stderr
    assert not (tmp_path / "datasets.json").exists()


def test_an_unknown_task_name_is_an_error():
    from lm_eval.tasks import TaskManager
    tm = TaskManager(include_defaults=False)
    with pytest.raises(harness.TaskDataError, match="'no_such_task' is not a task"):
        harness.load_tasks(tm, [{"name": "no_such_task"}])


# ---------------------------------------------------------------------------------------------------
# The DAG
# ---------------------------------------------------------------------------------------------------

def snakemake(tmp: Path, configfile: Path, target: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp),
           "--configfile", str(configfile), "--cores", "2", *extra, target]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.workflow
def test_dag_runs_the_stage_for_ref_offline(tmp_path):
    """materialise_base -> make_data (file source of IFEval pairs) -> make_lm_eval_ifeval -> run_lm_eval ->
    score_lm_eval, through Snakemake and `python -m eval`."""
    model = build_tiny_model(tmp_path / "tiny")
    rows = ifeval_rows()
    write_jsonl([pair_row(rows[k]) for k in TRAIN_KEYS], tmp_path / "train.jsonl")
    # Table 1's gold judge needs test rows it can score (make_data checks): the held-out prompts whose
    # instructions are all checkable offline
    checkable = [k for k in HELDOUT if not set(rows[k]["instruction_id_list"]) & verifiable.UNSUPPORTED_OFFLINE]
    assert len(checkable) >= 2
    write_jsonl([pair_row(rows[k]) for k in checkable], tmp_path / "test.jsonl")
    cfg = {"seed": 1, "base_model": {"source": str(model)}, "sft": {"enabled": False},
           "data": {"source": "file",
                    "splits": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")}},
           "methods": {"dpo": {"loss": "dpo", "beta": 0.1}}, "table1": {"pairs": [["dpo", "ref"]]},
           "figures": {"logps_methods": ["dpo"]},
           "lm_eval": {"enabled": True, "limit": 2, "max_gen_toks": 4, "threads": 1}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = snakemake(tmp_path, path, "results/scores/lm_eval/ref.json")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    for rule in ("make_lm_eval_ifeval", "run_lm_eval", "score_lm_eval"):
        assert f"rule {rule}:" in run.stdout + run.stderr
    rows_out = json.loads((tmp_path / "results/scores/lm_eval/ref.json").read_text(), parse_constant=float)
    assert {r["metric"] for r in rows_out} == {f"lm_eval/ifeval_heldout/{m}" for m in METRICS}
    assert all(r["n"] == 2 for r in rows_out)
    assert len(list((tmp_path / "results/lm_eval/ref").glob("samples_ifeval_heldout_*.jsonl"))) == 1


@pytest.mark.workflow
def test_quickstart_dry_run_has_the_harness_jobs(tmp_path):
    run = snakemake(tmp_path, REPO / "config/config.yaml", "results/table1.csv", "-n", "-p")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-3000:]
    stats = out.split("Job stats:")[-1]
    for rule, n in (("make_lm_eval_ifeval", 1), ("run_lm_eval", 3), ("score_lm_eval", 3)):
        assert f"{rule} " in stats and str(n) in stats.split(f"{rule} ")[1].split("\n")[0]
    assert "check_lm_eval_datasets" not in out  # no hub task offline
    for m in ("ref", "dpo", "rpo"):
        assert f"results/scores/lm_eval/{m}.json" in out.split("rule make_table1:")[1].split("\n")[1]


@pytest.mark.workflow
def test_the_offline_ifeval_with_hub_preference_data_is_refused_up_front(tmp_path):
    # paper-beta (it extends paper-common) with the held-out task instead of the hub's: its preference data has
    # no IFEval prompts. A dry run plans it and warns; a real run stops in its preflight (tests/test_preflight.py)
    cfg = {"extends": "config/paper-beta.yaml", "lm_eval": {"tasks": [{"name": "ifeval_heldout"}]}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = snakemake(tmp_path, path, "results/table1.csv", "-n")
    assert run.returncode == 0, run.stderr[-3000:]
    assert ("rpo preflight (dry run, not fatal): lm_eval.tasks[0]: 'ifeval_heldout' evaluates the held-out prompts "
            "by their IFEval key (meta.key, which data.source synthetic:verifiable writes), and data.source is "
            "'hf:HuggingFaceH4/ultrafeedback_binarized', a hub preference set without them") in run.stderr


def test_the_packaged_ifeval_task_holds_every_packaged_prompt(tmp_path):
    from rpo import verifiable
    summary = harness.make_ifeval_task(task=harness.PACKAGED_IFEVAL, out_yaml=str(tmp_path / "t.yaml"),
                                       out_data=str(tmp_path / "t.jsonl"), out_summary=str(tmp_path / "s.json"))
    rows = verifiable.load_prompts()
    usable = [r for r in rows if verifiable.row_problem(r) is None]
    # google/IFEval's 541 prompts; those the offline verifiers cannot check are excluded and counted
    assert summary["prompts"] == len(rows) == 541 and summary["evaluated_prompts"] == len(usable)
    assert summary["excluded_unsupported_offline"] + summary["excluded_random_parameters"] == 541 - len(usable) > 0
    docs = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [str(d["key"]) for d in docs] == [r["key"] for r in usable]
    task = yaml.safe_load((tmp_path / "t.yaml").read_text())
    assert task["task"] == "ifeval_packaged" and task["include"] == str(harness.harness_ifeval_yaml())
