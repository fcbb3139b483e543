"""The plan of a run (rpo/plan.py), on small configs resolved as the workflow resolves them (helpers.workflow:
the schema's defaults, the method zoo and the fused models' experts folded in, Table 1's all_vs_ref and fusion
pairs): the runs and their seeds, each method's reference, Table 1's pairs per seed, the overoptimization study's
runs and settings, each training stage's config. And that parsing the workflow imports no torch.

Run: pytest -q tests/test_plan.py      (about 15 s)
"""
from __future__ import annotations

import subprocess
import sys

import pytest
from helpers.workflow import REPO, plan_of

from rpo.config import hyperparameters
from rpo.plan import stage_cfg, top_layers_of

PAPER_PAIRS = [("rpo", "ref"), ("rpo", "dpo"), ("dpo", "ref")]  # the schema's table1.pairs


def test_one_run_per_method_with_the_training_seed():
    p = plan_of()
    assert (p.methods, p.seeds, p.runs, p.replicas) == (["dpo", "rpo"], [42], ["dpo", "rpo"], {})
    assert (p.run_method("rpo"), p.run_seed("rpo"), p.run_seed("ref")) == ("rpo", 42, 42)
    assert p.replica("rpo", 42) == "rpo" and p.replica("ref", 7) == "ref"
    assert p.table1_pairs == PAPER_PAIRS and p.seed_pairs == {}
    assert p.references == {"dpo": "ref", "rpo": "ref"}


def test_seeds_replicate_every_run_and_table1_pair():
    p = plan_of(seeds=[1, 2])
    assert p.runs == ["dpo", "rpo", "dpo-seed2", "rpo-seed2"]
    assert {r: (p.run_method(r), p.run_seed(r)) for r in p.runs} == {
        "dpo": ("dpo", 1), "rpo": ("rpo", 1), "dpo-seed2": ("dpo", 2), "rpo-seed2": ("rpo", 2)}
    # the configured pairs, then each again with the second seed's runs (ref is one model)
    assert p.table1_pairs == [*PAPER_PAIRS, ("rpo-seed2", "ref"), ("rpo-seed2", "dpo-seed2"), ("dpo-seed2", "ref")]
    assert p.seed_pairs == {"rpo_vs_ref": [["rpo", "ref"], ["rpo-seed2", "ref"]],
                            "rpo_vs_dpo": [["rpo", "dpo"], ["rpo-seed2", "dpo-seed2"]],
                            "dpo_vs_ref": [["dpo", "ref"], ["dpo-seed2", "ref"]]}
    # a replica trains its method with its own seed
    assert p.run_cfg("dpo-seed2")["seed"] == 2 and p.run_cfg("dpo")["seed"] == 1
    # judge_validity checks Table 1's pairs unless it names its own
    assert p.validity_pairs == [list(x) for x in p.table1_pairs]
    assert p.validity_models == ["dpo", "dpo-seed2", "ref", "rpo", "rpo-seed2"]
    assert plan_of(seeds=[1, 2], judge_validity={"pairs": [["rpo", "dpo"]]}).validity_models == ["dpo", "rpo"]


def test_the_method_zoo_adds_its_methods_their_references_and_their_pairs_with_ref():
    zoo = {"ipo": {"loss": "ipo", "beta": 0.1}, "rpo_soup": {"loss": "rpo", "beta": 0.1, "eta": 1.0, "reference": "soup"}}
    p = plan_of(method_zoo={"enabled": True, "methods": zoo})
    assert p.runs == ["dpo", "ipo", "rpo", "rpo_soup"]
    assert p.references == {"dpo": "ref", "ipo": "ref", "rpo": "ref", "rpo_soup": "soup"}
    # all_vs_ref: each method without a pair with Ref gets one, in name order
    assert p.table1_pairs == [*PAPER_PAIRS, ("ipo", "ref"), ("rpo_soup", "ref")]
    assert plan_of(method_zoo={"enabled": False, "methods": zoo}).runs == ["dpo", "rpo"]
    off = plan_of(method_zoo={"enabled": True, "methods": zoo}, table1={"all_vs_ref": False, "pairs": [["rpo", "dpo"]]})
    assert off.table1_pairs == [("rpo", "dpo")]


def test_fusion_trains_its_experts_and_adds_its_models_pairs():
    fusion = {"enabled": True,
              "methods": {"dpo_base": {"loss": "dpo", "beta": 0.1, "reference": "base"}},
              "models": {"dpo_fused": {"large": "ref", "small": "base", "experts": ["dpo_base"]}},
              "pairs": [["dpo_fused", "dpo"]]}
    p = plan_of(fusion=fusion)
    assert p.runs == ["dpo", "dpo_base", "rpo"] and p.reference("dpo_base") == "base"
    # the expert vs Ref (all_vs_ref), then fusion.pairs, then the fused model vs Ref
    assert p.table1_pairs == [*PAPER_PAIRS, ("dpo_base", "ref"), ("dpo_fused", "dpo"), ("dpo_fused", "ref")]


def test_stage_configs_keep_the_global_batch_and_leave_threads_out():
    p = plan_of(training={"global_batch_size": 128, "micro_batch_size": 2, "threads": 3},
                resources={"training": {"gpus": 8, "nodes": 2}})
    cfg = p.train_cfg("training")
    # 128 = 2 per rank x 16 ranks x 4 accumulation steps
    assert (cfg["world_size"], cfg["gradient_accumulation_steps"], cfg["global_batch_size"]) == (16, 4, 128)
    assert "threads" not in cfg and cfg["seed"] == 42
    sft = p.train_cfg("sft")  # sft.train's, on resources.sft (one process): 128 = 4 x 1 x 32 (schema defaults)
    assert (sft["world_size"], sft["gradient_accumulation_steps"], sft["micro_batch_size"]) == (1, 32, 4)
    with pytest.raises(ValueError, match="study: global_batch_size"):
        stage_cfg({"global_batch_size": 10, "micro_batch_size": 4}, {"gpus": 0, "nodes": 1}, "study")


def test_the_study_expands_its_grid_over_its_own_data_and_training():
    p = plan_of(data={"source": "synthetic:verifiable", "synthetic": {"n_train_prompts": 30}},
                training={"learning_rate": 1e-3}, overoptimization={
        "grid": {"dpo": {"loss": "dpo", "beta": [0.05, 0.2]}, "rpo": {"loss": "rpo", "beta": 0.1, "eta": [0.5, 1.0]}},
        "seeds": [3, 4], "snapshot_every": 5,
        "data": {"synthetic": {"label_noise": 0.2}}, "training": {"epochs": 7, "lora": {"top_layers": 4}}})
    s = p.study
    assert s.run_names == ["dpo-beta0.05", "dpo-beta0.2", "rpo-eta0.5", "rpo-eta1"]
    assert s.runs["rpo-eta0.5"] == {"loss": "rpo", "beta": 0.1, "eta": 0.5} and s.seeds == [3, 4]
    # the study's keys on top of data and training, key by key
    assert s.data["synthetic"]["label_noise"] == 0.2 and s.data["synthetic"]["n_train_prompts"] == 30
    assert (s.training["epochs"], s.training["learning_rate"], s.training["lora"]["r"]) == (7, 1e-3, 16)
    assert s.trunk_top == 4
    assert p.trunk_top == 0  # the main training has LoRA on every layer: no trunk
    cfg = p.study_cfg(4)
    assert (cfg["seed"], cfg["snapshot_every"], cfg["epochs"], cfg["world_size"]) == (4, 5, 7, 1) and "threads" not in cfg
    specs = s.specs()
    assert [(x["name"], x["seed"]) for x in specs] == [(r, seed) for r in s.run_names for seed in (3, 4)]
    assert specs[-1] == {"name": "rpo-eta1", "loss": "rpo", "seed": 4, "hparams": {"beta": 0.1, "eta": 1.0},
                         "label_noise": 0.2, "pairs": "study"}
    assert s.rso == {} and not s.needs_reward_models


def test_an_rso_family_of_the_study_shares_its_pairs_and_gets_its_own_reward_models():
    rso = {"loss": "hinge", "beta": [0.05, 0.2], "sampling": {"n_candidates": 8, "m_accepted": 2, "beta": 0.5,
                                                              "labeller": "reward"}}
    p = plan_of(training={"lora": {"top_layers": 4}, "trunk_cache": True},
                reward_models={"training": {"epochs": 3, "learning_rate": 5e-4}},
                overoptimization={"grid": {"dpo": {"loss": "dpo", "beta": 0.1}, "rso": rso},
                                  "seeds": [1], "training": {"epochs": 7}})
    s = p.study
    assert s.run_names == ["dpo", "rso-beta0.05", "rso-beta0.2"]
    # one family, one sampling (the schema's defaults filled in), shared by its runs; dpo trains on the study's pairs
    assert list(s.rso) == ["rso"] and s.rso["rso"]["reward"] == "mean" and s.rso["rso"]["max_new_tokens"] == 64
    assert [s.rso_family(r) for r in s.run_names] == [None, "rso", "rso"]
    assert [x["pairs"] for x in s.specs()] == ["study", "rso", "rso"]
    assert s.specs()[1]["hparams"] == {"beta": 0.05}  # the sampling is not a loss hyperparameter
    assert s.needs_reward_models
    # the study's reward models: the study's training with reward_models.training on top, from the study's trunk
    assert (s.reward_training["epochs"], s.reward_training["learning_rate"]) == (3, 5e-4)
    assert s.reward_trunk_top == 4 == s.trunk_top
    cfg = p.study_reward_cfg(2)
    assert (cfg["seed"], cfg["epochs"], cfg["world_size"], cfg["snapshot_every"]) == (2, 3, 1, 0)  # no snapshots
    # reward models cut elsewhere than the study's trunk start from the bottom
    other = plan_of(training={"lora": {"top_layers": 4}, "trunk_cache": True},
                    reward_models={"training": {"lora": {"top_layers": 2}}}, overoptimization={"grid": {"rso": rso}})
    assert other.study.trunk_top == 4 and other.study.reward_trunk_top == 0
    gold = {**rso, "sampling": {**rso["sampling"], "reward": "gold", "labeller": "gold"}}
    assert not plan_of(overoptimization={"grid": {"rso": gold}}).study.needs_reward_models


def test_hyperparameters_are_a_methods_keys_but_what_it_trains_on():
    method = {"loss": "hinge", "name": "rso", "reference": "ref", "beta": 0.1,
              "sampling": {"n_candidates": 4, "m_accepted": 2, "beta": 0.5}, "rounds": {"n": 2}}
    assert hyperparameters(method) == {"beta": 0.1}


def test_top_layers_of():
    lora = {"trunk_cache": True, "finetuning": "lora", "lora": {"top_layers": 8}}
    assert top_layers_of(lora) == 8
    assert top_layers_of({**lora, "trunk_cache": False}) == 0
    assert top_layers_of({**lora, "finetuning": "full"}) == 0
    assert top_layers_of({**lora, "lora": {"top_layers": None}}) == 0


PARSE = """
import sys
from snakemake.cli import main
try:
    main([*sys.argv[2:], "-n", "--quiet", "all", "--cores", "1", "--snakefile", "Snakefile",
          "--configfile", "config/config.yaml", "--directory", sys.argv[1]])
except SystemExit as e:
    assert e.code == 0, e.code
heavy = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
print("HEAVY", heavy)
"""


@pytest.mark.workflow  # a dry run, in seconds
def test_planning_the_workflow_imports_no_torch(tmp_path):
    """Every cluster job re-parses the workflow: the dry run of every target (parse and DAG) imports no torch."""
    targets = ["results/table1.csv", "results/overoptimization.csv", "results/bon.csv", "results/online.csv"]
    run = subprocess.run([sys.executable, "-c", PARSE, str(tmp_path), *targets], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "This was a dry-run" in run.stdout + run.stderr  # the whole DAG was planned
    assert "HEAVY []" in run.stdout, run.stdout[-2000:]
