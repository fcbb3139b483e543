"""RSO's jobs in the workflow (issue 26). In the overoptimization study: a grid family with `sampling` trains on
pairs rejection-sampled from the study's reference (the base model) for the study's training prompts, scored by
reward models trained on the study's own pairs, and is measured like every other run of the study. As a method:
its pairs' reference log-probs are tokenised as its training tokenises them.

The dry runs check what each job reads and writes; the slow test runs the study end to end:
    pytest tests/test_rso_workflow.py -q -m slow      (about 4 minutes on 2 CPU cores)
(the method end to end: tests/test_bon_workflow.py)
"""
from __future__ import annotations

import csv
import json
import re

import pytest
import yaml
from helpers.workflow import args_of, jobs, snakemake, tiny_config

pytestmark = pytest.mark.workflow

SAMPLING = {"n_candidates": 4, "m_accepted": 2, "beta": 0.5, "labeller": "reward", "max_new_tokens": 6,
            "batch_size": 4}


def study_config(tmp, grid_extra: dict, **study) -> object:
    cfg = yaml.safe_load(tiny_config(tmp).read_text())
    cfg["overoptimization"]["grid"].update(grid_extra)
    cfg["overoptimization"].update(study)
    path = tmp / "config-study-rso.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_study_rso_chain_reads_the_base_model_and_the_study_pairs(tmp_path):
    cfg = study_config(tmp_path, {"rso": {"loss": "hinge", "beta": [0.1, 0.5], "sampling": SAMPLING}})
    run = snakemake(tmp_path, cfg, "-n", "-p", target="results/overoptimization.csv")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    found = jobs(run.stdout)
    by_rule = {}
    for j in found:
        by_rule.setdefault(j["rule"], []).append(j)
    # one set of candidates, scores, pairs and reference log-probs for the family; its 2 runs x 2 seeds train on them
    for rule in ("study_rso_candidates", "study_rso_scores", "study_rso_pairs", "study_rso_reference_logps"):
        assert len(by_rule[rule]) == 1, rule
    assert "study_rso_gold" not in by_rule  # reward and labeller are the ensemble's: no gold enters RSO's training
    assert len(by_rule["study_train_reward_model"]) == 2  # .test's reward_models.seeds
    # the family's chain (the study's longest) is scheduled before the other runs' trainings (priority 1)
    first = {m.group(1) for m in re.finditer(r"rule (\w+):\n(?:    .*\n)*?    priority: 2\n", run.stdout)}
    assert first == {"study_train_reward_model", "study_rso_candidates", "study_rso_scores"}
    # the main pipeline's RSO and reward models are not built
    assert not {"rso_candidates", "train_reward_model", "rso_pairs"} & set(by_rule)

    cand = args_of(by_rule["study_rso_candidates"][0])
    assert (cand["ref_dir"], cand["prompts_path"]) == ("results/models/base", "results/overopt/data/train.jsonl")
    assert (cand["n"], cand["max_new_tokens"]) == (4, 6)
    for j in by_rule["study_train_reward_model"]:
        a = args_of(j)
        assert (a["base_dir"], a["pairs_path"], a["test_path"]) == (
            "results/models/base", "results/overopt/data/train.jsonl", "results/overopt/data/test.jsonl")
        assert a["out_dir"].startswith("results/overopt/reward_models/seed")
        assert a["ckpt_dir"].startswith("results/overopt/checkpoints/reward_model_seed")
    scores = args_of(by_rule["study_rso_scores"][0])
    assert scores["model_dirs"] == [f"results/overopt/reward_models/seed{s}/model" for s in (1, 2)]
    assert scores["base_dir"] == "results/models/base"
    pairs = args_of(by_rule["study_rso_pairs"][0])
    assert (pairs["reward"], pairs["labeller"], pairs["m_accepted"], pairs["beta"]) == ("mean", "reward", 2, 0.5)
    assert pairs["score_paths"] == [f"results/overopt/rso/rso/scores/seed{s}.jsonl" for s in (1, 2)]
    assert pairs["gold_path"] is None
    ref = args_of(by_rule["study_rso_reference_logps"][0])
    assert (ref["model_dir"], ref["pairs_path"]) == ("results/models/base", "results/overopt/rso/rso/train.jsonl")
    study_ref = args_of(by_rule["study_reference_logps"][0])
    assert {k: ref[k] for k in ("max_length", "max_prompt_length", "top_layers")} == {
        k: study_ref[k] for k in ("max_length", "max_prompt_length", "top_layers")}

    trained = {j["wildcards"]: args_of(j) for j in by_rule["study_train"]}
    assert len(trained) == 8  # dpo, rpo and the 2 RSO runs, 2 seeds each
    for wc, a in trained.items():
        rso = "run=rso-" in wc
        assert a["pairs_path"] == ("results/overopt/rso/rso/train.jsonl" if rso else "results/overopt/data/train.jsonl")
        assert a["reference_cache"] == ("results/overopt/rso/rso/train_logps.pt" if rso
                                        else "results/overopt/reference/train_logps.pt")
        assert a["ref_dir"] == "results/models/base"
    assert {trained[wc]["method"]["beta"] for wc in trained if "run=rso-" in wc} == {0.1, 0.5}


def test_on_synthetic_data_the_gold_only_records_how_it_orders_the_proxys_pairs(tmp_path):
    # .test's data is files; on synthetic:verifiable data every prompt has its verifiers, so the candidates' gold
    # goes to the pairs' job, whose pairs it does not change (rpo.rso: pairs_by_gold in the summary)
    cfg = study_config(tmp_path, {"rso": {"loss": "hinge", "beta": 0.1, "sampling": SAMPLING}},
                       data={"source": "synthetic:verifiable"})
    run = snakemake(tmp_path, cfg, "-n", "-p", target="results/overopt/rso/rso/train.jsonl")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    by_rule = {j["rule"]: args_of(j) for j in jobs(run.stdout)}
    assert by_rule["study_rso_gold"]["samples_path"] == "results/overopt/rso/rso/candidates.jsonl"
    pairs = by_rule["study_rso_pairs"]
    assert (pairs["reward"], pairs["labeller"], pairs["gold_path"]) == ("mean", "reward", "results/overopt/rso/rso/gold.jsonl")


def test_a_gold_labelled_rso_family_needs_no_reward_model(tmp_path):
    gold = {**SAMPLING, "reward": "gold", "labeller": "gold"}
    cfg = study_config(tmp_path, {"rso": {"loss": "hinge", "beta": 0.1, "sampling": gold}})
    run = snakemake(tmp_path, cfg, "-n", target="results/overoptimization.csv")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rules = {j["rule"] for j in jobs(run.stdout)}
    assert "study_rso_gold" in rules and not {"study_train_reward_model", "study_rso_scores"} & rules


@pytest.mark.slow  # about 25 Snakemake jobs
def test_study_with_an_rso_family_end_to_end(tmp_path):
    cfg = study_config(tmp_path, {"rso": {"loss": "hinge", "beta": 0.1, "sampling": SAMPLING}}, seeds=[1])
    run = snakemake(tmp_path, cfg, target="results/overoptimization.csv")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    rso = tmp_path / "results/overopt/rso/rso"
    summary = json.loads((rso / "summary.json").read_text())
    n_prompts = len({json.loads(x)["id"] for x in (tmp_path / "results/overopt/data/train.jsonl").open()})
    assert summary["prompts"] == n_prompts and summary["candidates"] == 4 * n_prompts
    assert summary["reward"] == "mean" and summary["pairs"] >= 1
    pairs = [json.loads(x) for x in (rso / "train.jsonl").open()]
    assert all(p["meta"]["rso"]["chosen_reward"] > p["meta"]["rso"]["rejected_reward"] for p in pairs)
    trained = json.loads((tmp_path / "results/overopt/runs/rso/seed1/train_summary.json").read_text())
    assert trained["tokenization"]["pairs"] == len(pairs)  # the family's pairs, not the study's
    assert trained["method"]["sampling"]["beta"] == 0.5 and trained["method"]["beta"] == 0.1
    for s in (1, 2):  # the study's reward models, trained on the study's pairs
        member = json.loads((tmp_path / f"results/overopt/reward_models/seed{s}/train_summary.json").read_text())
        assert member["tokenization"]["pairs"] == sum(1 for _ in (tmp_path / "results/overopt/data/train.jsonl").open())
    rows = list(csv.DictReader((tmp_path / "results/overoptimization.csv").open()))
    assert {(r["method"], r["loss"], r["pairs"]) for r in rows} == {
        ("dpo-beta0.5", "dpo", "study"), ("rpo-eta0.5", "rpo", "study"), ("rso", "hinge", "rso")}
    steps = {r["step"] for r in rows if r["method"] == "rso"}
    assert "0" in steps and len(steps) >= 2
    assert (tmp_path / "results/figures/overoptimization.png").read_bytes()[:4] == b"\x89PNG"


def test_an_rso_methods_reference_pass_tokenises_as_its_training(tmp_path):
    # data.chat_format reaches RSO's reference pass as it reaches the data's and the training's
    cfg = yaml.safe_load(tiny_config(tmp_path).read_text())
    cfg["data"]["chat_format"] = "authors"
    cfg["methods"]["rso"] = {"loss": "hinge", "beta": 0.1, "sampling": SAMPLING}
    path = tmp_path / "config-rso-authors.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = snakemake(tmp_path, path, "-n", "-p", target="results/train/rso/model")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    by_rule = {j["rule"]: args_of(j) for j in jobs(run.stdout)}
    assert by_rule["rso_reference_logps"]["chat_format"] == "authors" == by_rule["train_preference"]["chat_format"]
    assert by_rule["rso_reference_logps"]["pairs_path"] == "results/rso/rso/train.jsonl"
