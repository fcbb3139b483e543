"""The `fusion` config block (eval/fusion_config.py): the schema's defaults, the experts folded into `methods`,
the fused models checked against the DAG's models (errors name the key), their Table 1 pairs; and the quickstart's
opt-in block as Snakemake plans it.

Run: pytest tests/test_fusion_config.py -q      (about 40 s: one Snakemake dry run)
     pytest -m slow tests/test_fusion_config.py -q      (config/fusion-gemma.yaml's dry run, ~1.5 min)
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from eval.fusion_config import fold_fusion_methods, fusion_sources, resolve_fusion, source_key
from rpo.config import check_config, resolve_methods

REPO = Path(__file__).resolve().parents[1]
SCHEMA = str(REPO / "workflow/schemas/config.schema.yaml")


def quickstart(**fusion) -> dict:
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    cfg["fusion"] = {**cfg["fusion"], "enabled": True, **fusion}
    return cfg


def resolve(cfg: dict) -> dict:
    """What common.smk does at start-up, in its order."""
    validate(cfg, SCHEMA, set_default=True)
    fold_fusion_methods(cfg)
    resolve_methods(cfg)
    check_config(cfg)
    return resolve_fusion(cfg)


def test_the_quickstart_block_resolves_with_the_schema_defaults():
    cfg = quickstart()
    fused = resolve(cfg)
    assert fused == {
        "dpo_fused": {"large": "ref", "small": "base", "experts": ["dpo_base"], "alpha": "dynamic", "vocab_check": "exact"},
        "rpo_fused": {"large": "ref", "small": "base", "experts": ["rpo_base"], "alpha": "dynamic", "vocab_check": "exact"}}
    assert cfg["methods"]["rpo_base"] == {"loss": "rpo", "beta": 0.1, "eta": 1.0, "reference": "base"}
    assert cfg["fusion"]["alpha_grid"] == {"max": 2.0, "step": 0.1}  # the paper's grid, from the schema
    pairs = [tuple(p) for p in cfg["table1"]["pairs"]]
    # the configured ones, every method vs Ref (the experts too), fusion.pairs, every fused model vs Ref
    assert pairs == [("rpo", "ref"), ("rpo", "dpo"), ("dpo", "ref"), ("dpo_base", "ref"), ("rpo_base", "ref"),
                     ("rpo_fused", "rpo"), ("dpo_fused", "dpo"), ("dpo_fused", "ref"), ("rpo_fused", "ref")]


def test_disabled_changes_nothing():
    cfg = yaml.safe_load((REPO / "config/config.yaml").read_text())
    before = copy.deepcopy(cfg)
    validate(before, SCHEMA, set_default=True)
    after = copy.deepcopy(before)
    fold_fusion_methods(after)
    assert resolve_fusion(after) == {} and after == before


@pytest.mark.parametrize("change,message", [
    (dict(models={"f": {"experts": ["rpo"]}}),
     r"fusion.models.f.experts\[0\]: method 'rpo' was trained from 'ref' \(its reference\), but small is 'base'"),
    (dict(models={"f": {"large": "nowhere", "experts": ["rpo_base"]}}),
     r"fusion.models.f.large: 'nowhere' is neither a model of the DAG \(ref, base or one of the methods"),
    (dict(models={"f": {"experts": ["rpo_base", "rpo_base"]}}), r"fusion.models.f.experts: .* names an expert twice"),
    (dict(models={"rpo": {"experts": ["rpo_base"]}}), r"fusion.models.rpo: the name is already a model of the DAG"),
    (dict(models={"f": {"small": "hf:org/small", "experts": ["rpo_base"]}}),
     r"method 'rpo_base' was trained from 'base' .* but small is 'hf:org/small'"),
    (dict(models={}, pairs=[]), r"fusion.enabled but fusion.models is empty"),
    (dict(pairs=[["rpo_fused", "nobody"]]), r"fusion.pairs\[0\] names model 'nobody'"),
    (dict(methods={"rpo": {"loss": "rpo", "beta": 0.1, "eta": 1.0}}), r"fusion.methods repeats run name\(s\) of "
                                                                      r"methods: \['rpo'\]"),
])
def test_errors_name_the_key(change, message):
    with pytest.raises(ValueError, match=message):
        resolve(quickstart(**change))


def test_a_method_named_base_is_refused():
    cfg = quickstart()
    cfg["methods"]["base"] = {"loss": "dpo", "beta": 0.1}
    with pytest.raises(ValueError, match="a method named 'base' is ambiguous in fusion.models"):
        resolve(cfg)


def test_several_seeds_are_refused():
    cfg = quickstart()
    cfg["seeds"] = [1, 2]
    with pytest.raises(ValueError, match="fusion.enabled with several `seeds`"):
        resolve(cfg)


def test_the_schema_refuses_a_bad_alpha_and_unknown_keys():
    for bad in ({"experts": [], "alpha": "fixed"}, {"experts": [], "alpha": -1}, {"experts": [], "alfa": 1}):
        with pytest.raises(Exception, match="alpha|alfa"):
            validate(quickstart(models={"f": bad}), SCHEMA, set_default=True)


def test_sources_and_the_ref_alias_without_sft():
    cfg = quickstart(models={"big": {"large": "hf:org/big-model@abc", "small": "ref", "experts": ["rpo"]},
                             "alone": {"large": "./models/x", "experts": []}}, pairs=[])
    fused = resolve(cfg)
    assert fused["alone"] == {"large": "./models/x", "small": None, "experts": [], "alpha": "dynamic",
                              "vocab_check": "exact"}
    assert fusion_sources(fused, cfg["methods"]) == {"hf_org_big-model_abc": "hf:org/big-model@abc",
                                                     "._models_x": "./models/x"}
    assert source_key("hf:org/big-model@abc") == "hf_org_big-model_abc"
    # without an SFT stage Ref is the base model, so a method trained against "ref" is an expert on "base"
    cfg = quickstart(models={"f": {"experts": ["rpo"]}}, pairs=[])
    cfg["sft"] = {"enabled": False}
    assert resolve(cfg)["f"]["experts"] == ["rpo"]


@pytest.mark.workflow
def test_the_quickstart_plans_the_fused_models(tmp_path):
    """snakemake -n on config/config.yaml with fusion.enabled: two expert trainings from the base model (its own
    reference pass), two fused models, each answered, judged and scored like every model."""
    cfg = quickstart()
    tmp = tmp_path
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                          str(tmp), "--configfile", str(path), "--cores", "2", "-n", "results/table1.csv"],
                         cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    from helpers.workflow import job_counts
    counts = job_counts(run.stdout + run.stderr)
    assert counts["train_preference"] == 4 and counts["reference_logps"] == 2 and counts["make_fused_model"] == 2
    for rule in ("generate_table1", "generate_mtbench", "generate_alpacaeval", "generate_arenahard", "run_lm_eval"):
        assert counts[rule] == 7, (rule, counts)  # ref, dpo, rpo, 2 experts, 2 fused models
    assert counts["judge_table1"] == 9
    out = run.stdout + run.stderr
    assert "results/models/fused/rpo_fused" in out and "results/reference/base/train_logps.pt" in out


def test_the_preflight_checks_a_fused_models_source_parts(tmp_path):
    from eval import preflight
    cfg = quickstart(models={"w2s": {"large": "hf:nobody/not-cached-model", "small": "base", "experts": ["rpo_base"]},
                             "local": {"large": str(tmp_path / "no_model"), "experts": []}}, pairs=[])
    resolve(cfg)
    problems = preflight.check(cfg, rules={"materialise_fusion_source"}, online=False, dryrun=True)
    assert any(p.startswith("fusion.models.w2s.large: the hub model 'nobody/not-cached-model' is not in the hub "
                            "cache") for p in problems), problems
    assert any(p.startswith("fusion.models.local.large:") and "is not a model directory" for p in problems), problems
    # no source job, no question
    assert not any("fusion.models" in p for p in preflight.check(cfg, rules={"make_table1"}, dryrun=True))


@pytest.mark.workflow
@pytest.mark.slow  # 94 s on the shared 2-core machine (the preflight's offline hub checks of every lm-eval task)
def test_the_gemma_weak_to_strong_config_plans_on_slurm(tmp_path):
    """config/fusion-gemma.yaml resolves its whole DAG (offline dry run, as tests/test_paper_configs.py): the 2B SFT
    model and its DPO/RPO experts trained on 8 GPUs, the 7B materialised once as a hub pointer, four fused models
    (one the 7B alone) answered on one GPU by the fusion backend, the other models by vLLM."""
    from helpers.workflow import dry_run, jobs
    out = dry_run(tmp_path, "config/fusion-gemma.yaml", "profiles/slurm")
    js = jobs(out)
    count = {}
    for j in js:
        count[j["rule"]] = count.get(j["rule"], 0) + 1
    assert count["train_sft"] == 1 and count["train_preference"] == 2 and count["materialise_fusion_source"] == 1
    assert count["make_fused_model"] == 4 and count["generate_table1"] == 7 and count["run_lm_eval"] == 7
    source = next(j for j in js if j["rule"] == "materialise_fusion_source")
    assert source["output"] == ["results/models/fusion_sources/hf_HuggingFaceH4_zephyr-7b-gemma-sft-v0.1"]
    fused = {j["wildcards"]: j for j in js if j["rule"] == "generate_table1"}
    assert '"backend": "fusion"' in fused["model=rpo_w2s"]["shell"].replace('\\"', '"')
    assert "vllm" in fused["model=rpo"]["shell"]
    assert fused["model=rpo_w2s"]["resources"]["gpu"] == "1"
    assert "fusion.models.rpo_w2s.large: the hub model 'HuggingFaceH4/zephyr-7b-gemma-sft-v0.1' is not in the hub " \
           "cache" in out  # the preflight names it (a dry run: a warning)
