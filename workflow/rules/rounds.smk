# Online rounds (issue 27; README "Online rounds", docs/online.md). A run is a method with `rounds` and a seed:
#   Table 1's (methods with rounds; results/train/<method>/ is its last round's policy), and
#   the online study's (online.methods x online.seeds; snakemake --cores all results/online.csv).
# Round r of run R, all under results/rounds/R/round<r>/: samples.jsonl (K per prompt from round r-1's policy)
# -> labels.jsonl + selected.jsonl (rpo/oracle.py, rpo/rounds.py) -> model/ (rpo/round_train.py, from round r-1's
# policy) [-> eval.jsonl, the study]. Each rule's settings are round r's own (rpo/round_plan.py), so adding a round
# runs only the new one, and changing round r's settings re-runs round r and the later ones.
from rpo import round_plan  # noqa: E402

ROUND_DIR = f"{RESULTS}/rounds"
ROUND = f"{ROUND_DIR}/{{run}}/round{{r}}"
ONLINE_DIR = f"{RESULTS}/online"
ONLINE = config["online"]

round_plan.check_study(config)
ROUND_RUNS = {**round_plan.main_runs(config, SEEDS), **round_plan.study_runs(config)}
ROUND_RUN_NAMES = "|".join(re.escape(r) for r in sorted(ROUND_RUNS)) or "^$"
MAIN_ROUND_METHODS = sorted(round_plan.online_methods(config["methods"]))


def _online_study_cfg():
    """The study's training config: `training` with online.training on top, checked against the schema's train."""
    import jsonschema
    from rpo.config import deep_merge

    schema = _yaml.safe_load(Path(workflow.basedir, "workflow/schemas/config.schema.yaml").read_text())
    merged = deep_merge(config["training"], ONLINE["training"])
    try:
        jsonschema.validate(merged, {"$defs": schema["$defs"], "$ref": "#/$defs/train"})
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path)
        raise ValueError(f"online.training{'.' + where if where else ''}: {e.message}") from None
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
    accumulation; the study's keys on top for its runs)."""
    from rpo import launch

    run = round_run(w)
    if not run["study"]:
        return {**train_cfg("training"), "seed": run["seed"]}
    cfg = ONLINE_TRAINING
    r = config["resources"]["training"]
    world = launch.world_size(r["gpus"], r["nodes"])
    accum = launch.accumulation_steps(cfg["global_batch_size"], cfg["micro_batch_size"], world, where="online.training")
    return {**{k: v for k, v in cfg.items() if k != "threads"}, "seed": run["seed"], "snapshot_every": 0,
            "world_size": world, "gradient_accumulation_steps": accum}


def needs_reference_samples(w):
    from rpo.losses.online import NEEDS_REFERENCE_SAMPLES

    return round_method_cfg(w)["loss"] in NEEDS_REFERENCE_SAMPLES


def round_chain(run, what):
    """Every round's file `what` of a run, in round order (its method's n rounds)."""
    info = ROUND_RUNS[run]
    n = (ONLINE["methods"] if info["study"] else config["methods"])[info["method"]]["rounds"]["n"]
    return [f"{ROUND_DIR}/{run}/round{r}/{what}" for r in range(1, n + 1)]


wildcard_constraints:
    run=ROUND_RUN_NAMES,
    r=r"[1-9][0-9]*",


rule round_prompts:
    # Table 1's runs: the training prompts of `data` (synthetic: IFEval's train split for the data's seed and sizes)
    input:
        train=f"{RESULTS}/data/train.jsonl",
    output:
        f"{ROUND_DIR}/prompts.jsonl",
    params:
        **job_params(
            lambda w: ({"source": "ifeval", "seed": config["seed"], "n_train": config["data"]["synthetic"]["n_train_prompts"],
                        "n_test": config["data"]["synthetic"]["n_test_prompts"],
                        "prompts_file": config["data"]["synthetic"]["prompts_file"]}
                       if config["data"]["source"] == "synthetic:verifiable" else {"source": "pairs", "seed": config["seed"]}),
            lambda w, input, output: {"out": output[0],
                                      **({} if config["data"]["source"] == "synthetic:verifiable" else {"pairs_path": input.train})}),
    resources:
        **res("cpu"),
    log:
        "logs/round_prompts/prompts.log",
    shell:
        "python -m rpo round-prompts --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule online_prompts:
    # the study's own prompts: IFEval's, a pool for the rounds and held-out prompts for the measurements
    output:
        prompts=f"{ONLINE_DIR}/prompts.jsonl",
        heldout=f"{ONLINE_DIR}/heldout.jsonl",
    params:
        **job_params(lambda w: {"source": "ifeval", "seed": config["seed"], **ONLINE["prompts"]},
                     lambda w, input, output: {"out": output.prompts, "heldout": output.heldout}),
    resources:
        **res("cpu"),
    log:
        "logs/online_prompts/prompts.log",
    shell:
        "python -m rpo round-prompts --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


def _sample_settings(w):
    s, m = round_settings(w), round_method_cfg(w)
    return {"start": round_plan.slice_start(m, int(w.r)), "count": s["prompts_per_round"],
            "samples_per_prompt": s["samples_per_prompt"], **s["sampling"],
            "seed": round_run(w)["seed"] * 1000 + int(w.r)}


rule sample_round:
    input:
        ref=round_ref_dir,
        prompts=round_pool,
        policy=round_previous,
    output:
        f"{ROUND}/samples.jsonl",
    params:
        **job_params(_sample_settings,
                     lambda w, input, output: {"ref_dir": input.ref, "prompts_path": input.prompts, "out": output[0],
                                               **({"policy_dir": input.policy[0]} if input.policy else {})}),
    threads: config["training"]["threads"]
    resources:
        **res("generation"),
    log:
        "logs/sample_round/{run}-round{r}.log",
    shell:
        "python -m rpo sample-round --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule sample_round_reference:
    # MPO's regularisation data: one sample per prompt of the round from the reference
    input:
        ref=round_ref_dir,
        prompts=round_pool,
    output:
        f"{ROUND}/reference_samples.jsonl",
    params:
        **job_params(lambda w: {**_sample_settings(w), "samples_per_prompt": 1},
                     lambda w, input, output: {"ref_dir": input.ref, "prompts_path": input.prompts, "out": output[0]}),
    threads: config["training"]["threads"]
    resources:
        **res("generation"),
    log:
        "logs/sample_round_reference/{run}-round{r}.log",
    shell:
        "python -m rpo sample-round --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule label_round:
    input:
        samples=f"{ROUND}/samples.jsonl",
        prompts=round_pool,
        reference=lambda w: [f"{ROUND_DIR}/{w.run}/round{w.r}/reference_samples.jsonl"] if needs_reference_samples(w) else [],
    output:
        labels=f"{ROUND}/labels.jsonl",
        selected=f"{ROUND}/selected.jsonl",
        summary=f"{ROUND}/label_summary.json",
    params:
        **job_params(lambda w: {k: round_settings(w)[k] for k in ("labeller", "selection", "keep")},
                     lambda w, input, output: {"samples": input.samples, "prompts_path": input.prompts,
                                               "labels": output.labels, "selected": output.selected,
                                               "summary": output.summary,
                                               **({"reference_samples": input.reference[0]} if input.reference else {})}),
    resources:
        **res("cpu"),
    log:
        "logs/label_round/{run}-round{r}.log",
    shell:
        "python -m rpo label-round --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule train_round:
    input:
        ref=round_ref_dir,
        selected=f"{ROUND}/selected.jsonl",
        start=round_previous,
    output:
        model=directory(f"{ROUND}/model"),
        metrics=f"{ROUND}/metrics.jsonl",
        summary=f"{ROUND}/train_summary.json",
    params:
        **job_params(
            lambda w: {"ckpt_dir": f"{RESULTS}/checkpoints/rounds/{w.run}/round{w.r}", "cfg": round_train_cfg(w),
                       "method": round_plan.round_method(round_run(w)["method"], round_method_cfg(w), int(w.r)),
                       "round": int(w.r), "logps_batch_size": config["reference"]["batch_size"],
                       **chat_format_param(w)},
            lambda w, input, output: {"ref_dir": input.ref, "selected": input.selected, "out_dir": output.model,
                                      "metrics_path": output.metrics, "summary_path": output.summary,
                                      **({"start_dir": input.start[0]} if input.start else {}),
                                      **({"previous_proximal": f"{input.start[0]}/proximal"}
                                         if input.start and round_method_cfg(w)["rounds"]["extrapolation"] else {})}),
    threads: config["training"]["threads"]
    priority: 1
    resources:
        **res("training"),
    log:
        "logs/train_round/{run}-round{r}.log",
    shell:
        "python -m rpo train-round --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule finish_rounds:
    # a method with rounds in Table 1: its last round's policy, every round's metrics (train_preference's outputs)
    input:
        models=lambda w: round_chain(w.method, "model"),
        metrics=lambda w: round_chain(w.method, "metrics.jsonl"),
        summaries=lambda w: round_chain(w.method, "train_summary.json"),
    output:
        model=directory(f"{RESULTS}/train/{{method}}/model"),
        metrics=f"{RESULTS}/train/{{method}}/metrics.jsonl",
        summary=f"{RESULTS}/train/{{method}}/train_summary.json",
    wildcard_constraints:
        method="|".join(re.escape(r) for r, v in ROUND_RUNS.items() if not v["study"]) or "^$",
    params:
        **job_params(lambda w: {},
                     lambda w, input, output: {"models": list(input.models), "metrics": list(input.metrics),
                                               "summaries": list(input.summaries), "out_dir": output.model,
                                               "metrics_path": output.metrics, "summary_path": output.summary}),
    resources:
        **res("cpu"),
    log:
        "logs/finish_rounds/{method}.log",
    shell:
        "python -m rpo finish-rounds --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


ruleorder: finish_rounds > train_preference


# ---------------------------------------------------------------------------------------------------
# The online study: every round of every run measured on held-out prompts, pooled over seeds
# ---------------------------------------------------------------------------------------------------

ONLINE_REF = f"{RESULTS}/models/base" if ONLINE["reference"] == "base" else get_ref_dir()


rule online_reference_answers:
    input:
        ref=ONLINE_REF,
        prompts=f"{ONLINE_DIR}/heldout.jsonl",
    output:
        f"{ONLINE_DIR}/reference/answers.jsonl",
    params:
        **job_params(lambda w: {"max_new_tokens": ONLINE["eval"]["max_new_tokens"], "batch_size": ONLINE["eval"]["batch_size"]},
                     lambda w, input, output: {"ref_dir": input.ref, "prompts_path": input.prompts, "out": output[0]}),
    threads: ONLINE["eval"]["threads"]
    resources:
        **res("generation"),
    log:
        "logs/online_reference_answers/ref.log",
    shell:
        "python -m rpo reference-answers --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


def online_labeller(w):
    """The labeller of a study method's proxy score: its first round's (the study's proxy of every round)."""
    return round_plan.round_settings(ONLINE["methods"][w.method], 1)["labeller"]


rule online_reference_records:
    # step 0 of each study method's curves: the reference (KL 0, its answers' gold and proxy score)
    input:
        prompts=f"{ONLINE_DIR}/heldout.jsonl",
        answers=f"{ONLINE_DIR}/reference/answers.jsonl",
    output:
        f"{ONLINE_DIR}/reference/{{method}}_eval.jsonl",
    wildcard_constraints:
        method="|".join(re.escape(m) for m in ONLINE["methods"]) or "^$",
    params:
        **job_params(lambda w: {"labeller": online_labeller(w),
                                "kl_samples_per_prompt": ONLINE["eval"]["kl_samples_per_prompt"]},
                     lambda w, input, output: {"prompts_path": input.prompts, "ref_answers": input.answers,
                                               "out": output[0]}),
    resources:
        **res("cpu"),
    log:
        "logs/online_reference_records/{method}.log",
    shell:
        "python -m rpo reference-records --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule evaluate_round:
    input:
        ref=round_ref_dir,
        model=f"{ROUND}/model",
        prompts=f"{ONLINE_DIR}/heldout.jsonl",
        answers=f"{ONLINE_DIR}/reference/answers.jsonl",
    output:
        f"{ROUND}/eval.jsonl",
    params:
        **job_params(lambda w: {"round": int(w.r), "labeller": round_plan.round_settings(round_method_cfg(w), 1)["labeller"],
                                "seed": round_run(w)["seed"],
                                **{k: v for k, v in ONLINE["eval"].items() if k != "threads"}},
                     lambda w, input, output: {"ref_dir": input.ref, "policy_dir": input.model,
                                               "prompts_path": input.prompts, "ref_answers": input.answers,
                                               "out": output[0]}),
    threads: ONLINE["eval"]["threads"]
    resources:
        **res("generation"),
    log:
        "logs/evaluate_round/{run}-round{r}.log",
    shell:
        "python -m rpo evaluate-round --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


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
                    "hparams": {k: x for k, x in m.items() if k not in ("loss", "reference", "rounds")},
                    "rounds": m["rounds"]})
    return out


def online_records(w):
    """Per run: the reference's records (step 0) and every round's eval.jsonl."""
    return [[f"{ONLINE_DIR}/reference/{s['name']}_eval.jsonl"] + round_chain(s["run"], "eval.jsonl")
            for s in online_specs(w)]


rule online:
    input:
        lambda w: [p for rs in online_records(w) for p in rs],
    output:
        csv=f"{RESULTS}/online.csv",
        figure=report(f"{RESULTS}/figures/online.png", category="Figures"),
    params:
        **job_params(lambda w: {"specs": online_specs(w), **ONLINE["bootstrap"]},
                     lambda w, input, output: {"records": online_records(w), "csv_path": output.csv,
                                               "figure": output.figure}),
    resources:
        **res("cpu"),
    log:
        "logs/online/online.log",
    shell:
        "python -m eval online --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"
