# What the rules of rounds.smk compute from the config and the wildcards (the rounds' plan itself is
# rpo/round_plan.py): the runs with rounds, each round's settings, paths and inputs.
from rpo import round_plan  # noqa: E402
from rpo.config import hyperparameters  # noqa: E402

ROUND_DIR = f"{RESULTS}/rounds"
ROUND = f"{ROUND_DIR}/{{run}}/round{{r}}"
ONLINE_DIR = f"{RESULTS}/online"
ONLINE = config["online"]

ROUND_RUNS = {**round_plan.main_runs(config, SEEDS), **round_plan.study_runs(config)}
ROUND_RUN_NAMES = "|".join(re.escape(r) for r in sorted(ROUND_RUNS)) or "^$"


def _online_study_cfg():
    """The study's training config: `training` with online.training on top, checked against the schema's train."""
    import jsonschema
    from rpo.config import deep_merge

    merged = deep_merge(config["training"], ONLINE["training"])
    try:
        jsonschema.validate(merged, {"$defs": SCHEMA["$defs"], "$ref": "#/$defs/train"})
    except jsonschema.ValidationError as e:
        where = "".join(f".{p}" for p in e.absolute_path)
        raise ValueError(f"online.training{where}: {e.message}") from None
    return merged


ONLINE_TRAINING = _online_study_cfg()


def round_run(w):
    return ROUND_RUNS[w.run]


def round_method_cfg(w):
    """The run's method (its `rounds` with defaults filled)."""
    run = round_run(w)
    return (ONLINE["methods"] if run["study"] else config["methods"])[run["method"]]


def round_ref_dir(w):
    """The run's reference and round-1 policy: Table 1's reference of the method, or the study's."""
    run = round_run(w)
    if run["study"]:
        return f"{RESULTS}/models/base" if ONLINE["reference"] == "base" else get_ref_dir()
    return reference_dir(reference_name(run["method"]))


def round_pool(w):
    return f"{ONLINE_DIR}/prompts.jsonl" if round_run(w)["study"] else f"{ROUND_DIR}/prompts.jsonl"


def round_previous(w):
    """Round r-1's policy (nothing for round 1: the reference)."""
    r = int(w.r)
    return [f"{ROUND_DIR}/{w.run}/round{r - 1}/model"] if r > 1 else []


def round_settings(w):
    return round_plan.round_settings(round_method_cfg(w), int(w.r))


def round_train_cfg(w):
    """Round training's config: the stage's training config with the run's seed (train_cfg's world size and
    accumulation; the study's keys on top for its runs; rpo.plan.stage_cfg)."""
    run = round_run(w)
    if not run["study"]:
        return {**train_cfg("training"), "seed": run["seed"]}
    return _plan.stage_cfg(ONLINE_TRAINING, config["resources"]["training"], "online.training", seed=run["seed"],
                           snapshot_every=0)


def needs_reference_samples(w):
    from rpo.losses.online import NEEDS_REFERENCE_SAMPLES

    return round_method_cfg(w)["loss"] in NEEDS_REFERENCE_SAMPLES


def round_chain(run, what):
    """Every round's file `what` of a run, in round order (its method's n rounds)."""
    info = ROUND_RUNS[run]
    n = (ONLINE["methods"] if info["study"] else config["methods"])[info["method"]]["rounds"]["n"]
    return [f"{ROUND_DIR}/{run}/round{r}/{what}" for r in range(1, n + 1)]


def _sample_settings(w):
    s, m = round_settings(w), round_method_cfg(w)
    return {"start": round_plan.slice_start(m, int(w.r)), "count": s["prompts_per_round"],
            "samples_per_prompt": s["samples_per_prompt"], **s["sampling"],
            "seed": round_run(w)["seed"] * 1000 + int(w.r)}


ONLINE_REF = f"{RESULTS}/models/base" if ONLINE["reference"] == "base" else get_ref_dir()


def online_labeller(w):
    """The labeller of a study method's proxy score: its first round's (the study's proxy of every round)."""
    return round_plan.round_settings(ONLINE["methods"][w.method], 1)["labeller"]


def online_runs():
    if not ONLINE["methods"]:
        raise ValueError("results/online.csv: online.methods is empty; give the study its methods "
                         "(config/config.yaml has the quickstart's)")
    return {run: v for run, v in ROUND_RUNS.items() if v["study"]}


def online_specs(w):
    """What eval.online needs of each run (in the order of online_records): its method, loss, settings, seed."""
    out = []
    for run, v in sorted(online_runs().items()):
        m = ONLINE["methods"][v["method"]]
        out.append({"run": run, "name": v["method"], "seed": v["seed"], "loss": m["loss"],
                    "hparams": hyperparameters(m),
                    "rounds": m["rounds"]})
    return out


def online_records(w):
    """Per run: the reference's records (step 0) and every round's eval.jsonl."""
    return [[f"{ONLINE_DIR}/reference/{s['name']}_eval.jsonl", *round_chain(s["run"], "eval.jsonl")]
            for s in online_specs(w)]
