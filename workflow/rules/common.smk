import json

from snakemake.utils import validate

validate(config, "../schemas/config.schema.yaml", set_default=True)

from rpo.config import check_config  # noqa: E402  (after validation filled the defaults)

check_config(config)

RESULTS = "results"
METHODS = sorted(config["methods"])
MODELS = ["ref"] + METHODS


def as_json(obj):
    """Rule parameters as one JSON string: deterministic, so a changed value re-runs only its rule."""
    return json.dumps(obj, sort_keys=True)


def get_ref_dir():
    return f"{RESULTS}/models/sft/model" if config["sft"]["enabled"] else f"{RESULTS}/models/base"


def get_policy_dir(model):
    return None if model == "ref" else f"{RESULTS}/train/{model}/model"


def get_table1_pairs():
    return [tuple(p) for p in config["table1"]["pairs"]]


wildcard_constraints:
    method="|".join(METHODS),
    model="|".join(MODELS),
