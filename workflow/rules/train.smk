# Every path a training job reads or writes is named once, in its rule's input / output (the checkpoint
# directory, deliberately not an output so that Snakemake never deletes it, in the settings); the
# arguments handed to `python -m rpo` are computed from them (common.smk, job_params).


rule train_sft:
    input:
        base=f"{RESULTS}/models/base",
        train=f"{RESULTS}/data/train.jsonl",
    output:
        model=directory(f"{RESULTS}/models/sft/model"),
        metrics=f"{RESULTS}/models/sft/metrics.jsonl",
        summary=f"{RESULTS}/models/sft/train_summary.json",
    params:
        **train_params(train_cfg("sft"), f"{RESULTS}/checkpoints/sft", extra=chat_format_param,
                       base_dir="base", pairs_path="train"),
        launch=launcher("sft"),
    threads: config["sft"]["train"]["threads"]
    resources:
        **res("sft"),
    log:
        "logs/train_sft/sft.log",
    shell:
        "{params.launch} train-sft --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule train_sft_seed:
    # Another SFT model, with another seed: an ingredient of the soup reference (SALSA).
    input:
        base=f"{RESULTS}/models/base",
        train=f"{RESULTS}/data/train.jsonl",
    output:
        model=directory(f"{RESULTS}/models/sft_seed{{seed}}/model"),
        metrics=f"{RESULTS}/models/sft_seed{{seed}}/metrics.jsonl",
        summary=f"{RESULTS}/models/sft_seed{{seed}}/train_summary.json",
    wildcard_constraints:
        seed=r"\d+",
    params:
        **train_params(lambda w: {**train_cfg("sft"), "seed": int(w.seed)},
                       lambda w: f"{RESULTS}/checkpoints/sft_seed{w.seed}", extra=chat_format_param,
                       base_dir="base", pairs_path="train"),
        launch=launcher("sft"),
    threads: config["sft"]["train"]["threads"]
    resources:
        **res("sft"),
    log:
        "logs/train_sft/sft_seed{seed}.log",
    shell:
        "{params.launch} train-sft --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule make_soup:
    # SALSA's reference: the parameter-wise mean of SFT models trained with different seeds.
    input:
        [sft_dir(s) for s in config["sft"]["soup_seeds"]],
    output:
        directory(SOUP_DIR),
    params:
        **job_params(lambda w: {}, lambda w, input, output: {"model_dirs": list(input), "out": output[0]}),
    resources:
        **res("cpu"),
    log:
        "logs/make_soup/soup.log",
    shell:
        "python -m rpo make-soup --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule reference_logps:
    # Once per (reference model, data, tokenisation): every method and every eta reuses this file.
    input:
        ref=lambda w: reference_dir(w.refname),
        train=f"{RESULTS}/data/train.jsonl",
    output:
        logps=reference_cache("{refname}"),
        **({"trunk": reference_trunk("{refname}")} if TRUNK_TOP else {}),
    wildcard_constraints:
        refname="ref|soup|base",
    params:
        **reference_params(config["training"], config["data"], TRUNK_TOP),
    threads: config["reference"]["threads"]
    # a short pass that every training waits for, on all of its threads: before the long one-thread jobs ready
    # with it (a sampler), which would otherwise hold one core while it waits for two, leaving the other idle
    priority: 3
    resources:
        **res("reference"),
    log:
        "logs/reference_logps/{refname}.log",
    shell:
        "python -m rpo reference-logps --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule train_preference:
    input:
        ref=lambda w: reference_dir(reference_name(w.method)),
        # a method's pairs and their reference log-probs: the data's, or RSO's own (reward_common.smk)
        train=lambda w: method_pairs(w.method),
        cache=lambda w: method_reference_cache(w.method),
        **({"trunk": lambda w: method_reference_trunk(w.method)} if TRUNK_TOP else {}),
    output:
        model=directory(f"{RESULTS}/train/{{method}}/model"),
        metrics=TRAIN_METRICS,
        summary=f"{RESULTS}/train/{{method}}/train_summary.json",
    params:
        **preference_params(lambda w: PLAN.run_cfg(w.method), lambda w: f"{RESULTS}/checkpoints/{w.method}",
                            lambda w: {"name": w.method, **PLAN.method(w.method)}, config["data"], TRUNK_TOP),
        launch=launcher("training"),
    threads: config["training"]["threads"]
    resources:
        **res("training"),
    log:
        "logs/train_preference/{method}.log",
    shell:
        "{params.launch} train-preference --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"
