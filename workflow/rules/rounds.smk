# Online rounds (issue 27; docs/online.md). A run is a method with `rounds` and a seed:
#   Table 1's (methods with rounds; results/train/<method>/ is its last round's policy), and
#   the online study's (online.methods x online.seeds; snakemake --cores all results/online.csv).
# Round r of run R, all under results/rounds/R/round<r>/: samples.jsonl (K per prompt from round r-1's policy)
# -> labels.jsonl + selected.jsonl (rpo/oracle.py, rpo/rounds.py) -> model/ (rpo/round_train.py, from round r-1's
# policy) [-> eval.jsonl, the study]. Each rule's settings are round r's own (rpo/round_plan.py), so adding a round
# runs only the new one, and changing round r's settings re-runs round r and the later ones. Each round job's wall
# and CPU time goes to logs/benchmarks/<rule>/ (Snakemake's benchmark files: what sizes the study's grid).


include: "rounds_common.smk"


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
    benchmark:
        "logs/benchmarks/sample_round/{run}-round{r}.tsv"
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
        # its own seed: not the policy's draws of round 1 (where the policy is the reference)
        **job_params(lambda w: {**_sample_settings(w), "samples_per_prompt": 1,
                                "seed": round_run(w)["seed"] * 1000 + 500 + int(w.r)},
                     lambda w, input, output: {"ref_dir": input.ref, "prompts_path": input.prompts, "out": output[0]}),
    threads: config["training"]["threads"]
    resources:
        **res("generation"),
    log:
        "logs/sample_round_reference/{run}-round{r}.log",
    benchmark:
        "logs/benchmarks/sample_round_reference/{run}-round{r}.tsv"
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
    benchmark:
        "logs/benchmarks/label_round/{run}-round{r}.tsv"
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
    benchmark:
        "logs/benchmarks/train_round/{run}-round{r}.tsv"
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
    benchmark:
        "logs/benchmarks/evaluate_round/{run}-round{r}.tsv"
    shell:
        "python -m rpo evaluate-round --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


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
