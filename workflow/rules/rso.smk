# RSO as a method (issue 26; Liu et al., ICLR 2024; docs/reward_models.md): a method with `sampling` trains on
# pairs drawn from pi_ref * exp(r / beta) by rejection sampling out of the Ref model's candidates for the training
# prompts, ranked by the labeller, then like any other method (rule train_preference, Table 1). Helpers:
# reward_common.smk.


rule rso_candidates:
    input:
        ref=get_ref_dir(),
        pairs=f"{RESULTS}/data/train.jsonl",
    output:
        f"{RSO_DIR}/{{rso}}/candidates.jsonl",
    wildcard_constraints:
        rso=RSO_NAMES,
    params:
        **job_params(lambda w: {"n": config["methods"][w.rso]["sampling"]["n_candidates"],
                                **{k: config["methods"][w.rso]["sampling"][k] for k in ("max_new_tokens", "batch_size", "seed")}},
                     lambda w, input, output: {"ref_dir": input.ref, "prompts_path": input.pairs, "out": output[0]}),
    threads: config["best_of_n"]["threads"]
    resources:
        **res("generation"),
    log:
        "logs/rso_candidates/{rso}.log",
    shell:
        "python -m rpo sample-candidates --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule rso_gold:
    input:
        pairs=f"{RESULTS}/data/train.jsonl",
        samples=f"{RSO_DIR}/{{rso}}/candidates.jsonl",
    output:
        f"{RSO_DIR}/{{rso}}/gold.jsonl",
    wildcard_constraints:
        rso=RSO_NAMES,
    params:
        **job_params(lambda w: {}, lambda w, input, output: {"prompts_path": input.pairs, "samples_path": input.samples,
                                                             "out": output[0]}),
    resources:
        **res("cpu"),
    log:
        "logs/rso_gold/{rso}.log",
    shell:
        "python -m rpo gold-candidates --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule rso_scores:
    # every member's score of every candidate, in one job (as score_bon)
    input:
        models=[f"{RM_DIR}/seed{s}/model" for s in RM_SEEDS],
        base=get_ref_dir(),
        samples=f"{RSO_DIR}/{{rso}}/candidates.jsonl",
    output:
        [f"{RSO_DIR}/{{rso}}/scores/seed{s}.jsonl" for s in RM_SEEDS],
    wildcard_constraints:
        rso=RSO_NAMES,
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
        "logs/rso_scores/{rso}.log",
    shell:
        "python -m rpo score-candidates --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule rso_pairs:
    input:
        unpack(rso_reward_inputs),
        samples=f"{RSO_DIR}/{{rso}}/candidates.jsonl",
        pairs=f"{RESULTS}/data/train.jsonl",
    output:
        pairs=f"{RSO_DIR}/{{rso}}/train.jsonl",
        summary=f"{RSO_DIR}/{{rso}}/summary.json",
    wildcard_constraints:
        rso=RSO_NAMES,
    params:
        **job_params(lambda w: {k: config["methods"][w.rso]["sampling"][k]
                                for k in ("reward", "labeller", "m_accepted", "beta", "seed", "uwo_lambda")},
                     lambda w, input, output: {"samples_path": input.samples, "pairs_path": input.pairs,
                                               "out": output.pairs, "summary_path": output.summary,
                                               "gold_path": input.get("gold"),
                                               "score_paths": list(input.scores) if "scores" in input.keys() else None}),
    resources:
        **res("cpu"),
    log:
        "logs/rso_pairs/{rso}.log",
    shell:
        "python -m rpo rso-pairs --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule rso_reference_logps:
    # the Ref model's log-probs of the method's own pairs (and the trunk of its LoRA top layers)
    input:
        ref=get_ref_dir(),
        train=f"{RSO_DIR}/{{rso}}/train.jsonl",
    output:
        logps=f"{RSO_DIR}/{{rso}}/train_logps.pt",
        **({"trunk": f"{RSO_DIR}/{{rso}}/train_trunk.f32"} if TRUNK_TOP else {}),
    wildcard_constraints:
        rso=RSO_NAMES,
    params:
        **job_params(
            lambda w: {"max_length": config["training"]["max_length"],
                       "max_prompt_length": config["training"]["max_prompt_length"],
                       "batch_size": config["reference"]["batch_size"], "dtype": config["training"]["precision"],
                       "attention": config["training"]["attention"], "top_layers": TRUNK_TOP},
            lambda w, input, output: {"model_dir": input.ref, "pairs_path": input.train, "out_path": output.logps,
                                      **({"trunk_path": output.trunk} if TRUNK_TOP else {})}),
    threads: config["reference"]["threads"]
    resources:
        **res("reference"),
    log:
        "logs/rso_reference_logps/{rso}.log",
    shell:
        "python -m rpo reference-logps --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"
