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
        **rso_candidates_params(method_sampling),
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
        **rso_scores_params(RM_TRAIN),
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
        unpack(rso_reward_inputs(method_sampling, RSO_DIR, config["data"])),
        samples=f"{RSO_DIR}/{{rso}}/candidates.jsonl",
        pairs=f"{RESULTS}/data/train.jsonl",
    output:
        pairs=f"{RSO_DIR}/{{rso}}/train.jsonl",
        summary=f"{RSO_DIR}/{{rso}}/summary.json",
    wildcard_constraints:
        rso=RSO_NAMES,
    params:
        **rso_pairs_params(method_sampling),
    resources:
        **res("cpu"),
    log:
        "logs/rso_pairs/{rso}.log",
    shell:
        "python -m rpo rso-pairs --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


use rule reference_logps as rso_reference_logps with:
    # the Ref model's log-probs of the method's own pairs (and the trunk of its LoRA top layers), tokenised as the
    # training pairs' (reference_logps' params: the data's chat format too)
    input:
        ref=get_ref_dir(),
        train=f"{RSO_DIR}/{{rso}}/train.jsonl",
    output:
        logps=f"{RSO_DIR}/{{rso}}/train_logps.pt",
        **({"trunk": f"{RSO_DIR}/{{rso}}/train_trunk.f32"} if TRUNK_TOP else {}),
    wildcard_constraints:
        rso=RSO_NAMES,
    log:
        "logs/rso_reference_logps/{rso}.log",
