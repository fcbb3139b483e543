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


BENCHMARKS = [b for b in ("mtbench", "alpacaeval", "arenahard") if config["benchmarks"][b]["enabled"]]


def get_judge_label(judge):
    """How the table names a judge: kind and model (never the URL or the key)."""
    return "gold (IFEval verifiers)" if judge["kind"] == "gold" else f"{judge['kind']}:{judge['model']}"


def bench_gen_args(benchmark, w, out, **extra):
    b = config["benchmarks"][benchmark]
    return as_json({"model_name": w.model, "ref_dir": get_ref_dir(), "policy_dir": get_policy_dir(w.model),
                    "out": out, "n_questions": b["n_questions"], "max_new_tokens": b["max_new_tokens"],
                    "batch_size": b["batch_size"], "seed": config["seed"], **extra})


def bench_subset(benchmark):
    return {"subset": config["benchmarks"][benchmark]["subset"]}
