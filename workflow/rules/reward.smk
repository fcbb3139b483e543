# Proxy reward models and best-of-n measured by the gold (issue 26; docs/reward_models.md):
#   snakemake --cores all results/bon.csv
# One reward model per seed of reward_models.seeds on the training pairs, the reference's best_of_n.n_samples
# samples per held-out prompt, every member's score and the gold score of each, then one tidy CSV and a figure
# (single member, mean, WCO, UWO against KL_bon). Settings and helpers: reward_common.smk.


rule train_reward_model:
    input:
        base=get_ref_dir(),
        train=f"{RESULTS}/data/train.jsonl",
        test=f"{RESULTS}/data/test.jsonl",
        **({"cache": reference_cache("ref"), "trunk": reference_trunk("ref")} if RM_TRUNK else {}),
    output:
        model=directory(f"{RM_DIR}/seed{{seed}}/model"),
        metrics=f"{RM_DIR}/seed{{seed}}/metrics.jsonl",
        summary=f"{RM_DIR}/seed{{seed}}/train_summary.json",
    wildcard_constraints:
        seed=r"\d+",
    params:
        **reward_model_params(rm_train_cfg, lambda w: f"{RESULTS}/checkpoints/reward_model_seed{w.seed}", RM_TRUNK),
        launch=launcher("training"),
    threads: RM_TRAIN["threads"]
    resources:
        **res("training"),
    log:
        "logs/train_reward_model/seed{seed}.log",
    shell:
        "{params.launch} train-reward-model --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule sample_bon:
    # N samples per held-out prompt from the reference (resumable: <output>.partial)
    input:
        ref=get_ref_dir(),
        prompts=f"{RESULTS}/data/prompts_test.jsonl",
    output:
        f"{BON_DIR}/samples.jsonl",
    params:
        **job_params(lambda w: {"n": config["best_of_n"]["n_samples"], "n_prompts": config["best_of_n"]["n_prompts"],
                                "max_new_tokens": config["best_of_n"]["max_new_tokens"],
                                "batch_size": config["best_of_n"]["batch_size"], "seed": config["best_of_n"]["seed"]},
                     lambda w, input, output: {"ref_dir": input.ref, "prompts_path": input.prompts, "out": output[0]}),
    threads: config["best_of_n"]["threads"]
    # the longest job that the scoring waits for: first, beside the members' trainings
    priority: 1
    resources:
        **res("generation"),
    log:
        "logs/sample_bon/samples.log",
    shell:
        "python -m rpo sample-candidates --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule gold_bon:
    input:
        prompts=f"{RESULTS}/data/prompts_test.jsonl",
        samples=f"{BON_DIR}/samples.jsonl",
    output:
        f"{BON_DIR}/gold.jsonl",
    params:
        **job_params(lambda w: {}, lambda w, input, output: {"prompts_path": input.prompts,
                                                             "samples_path": input.samples, "out": output[0]}),
    resources:
        **res("cpu"),
    log:
        "logs/gold_bon/gold.log",
    shell:
        "python -m rpo gold-candidates --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule score_bon:
    # every member's score of every sample, in one job: LoRA members on the top layers share the layers below
    input:
        models=[f"{RM_DIR}/seed{s}/model" for s in RM_SEEDS],
        base=get_ref_dir(),
        samples=f"{BON_DIR}/samples.jsonl",
    output:
        BON_SCORES,
    params:
        **job_params(lambda w: {"max_length": RM_TRAIN["max_length"], "max_prompt_length": RM_TRAIN["max_prompt_length"],
                                "batch_size": config["reward_models"]["eval_batch_size"]},
                     lambda w, input, output: {"model_dirs": list(input.models), "base_dir": input.base,
                                               "samples_path": input.samples, "outs": list(output)}),
    # forward passes over fixed sequences, as the reference pass: its threads
    threads: config["reference"]["threads"]
    resources:
        **res("generation"),
    log:
        "logs/score_bon/scores.log",
    shell:
        "python -m rpo score-candidates --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule best_of_n:
    input:
        gold=f"{BON_DIR}/gold.jsonl",
        scores=BON_SCORES,
    output:
        csv=f"{RESULTS}/bon.csv",
        figure=report(f"{RESULTS}/figures/bon.png", category="Figures"),
    params:
        **job_params(lambda w: {"members": [f"rm-seed{s}" for s in RM_SEEDS], "ns": config["best_of_n"]["ns"],
                                "lam": config["best_of_n"]["uwo_lambda"], "samples_seed": config["best_of_n"]["seed"],
                                **config["best_of_n"]["bootstrap"]},
                     lambda w, input, output: {"gold_path": input.gold, "score_paths": list(input.scores),
                                               "csv_path": output.csv, "figure": output.figure}),
    resources:
        **res("cpu"),
    log:
        "logs/best_of_n/bon.log",
    shell:
        "python -m eval best-of-n --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"
