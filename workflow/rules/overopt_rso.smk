# RSO in the overoptimization study (issue 26; docs/reward_models.md): a grid family with `sampling` trains its runs
# on pairs drawn by rejection sampling from the study's reference (the base model) for the study's training prompts.
# Its reward r, when an ensemble objective, comes from the study's own reward models: reward_models' members
# (seeds, l2, reward_models.training's keys) trained on the study's pairs from the base model, so the study's label
# noise reaches RSO through them as it reaches the other runs through the pairs. The rules are reward.smk's and
# rso.smk's with the study's paths; helpers: common.smk (study_run_input) and reward_common.smk.


use rule train_reward_model as study_train_reward_model with:
    input:
        base=f"{RESULTS}/models/base",
        train=f"{STUDY_DIR}/data/train.jsonl",
        test=f"{STUDY_DIR}/data/test.jsonl",
        **({"cache": f"{STUDY_DIR}/reference/train_logps.pt", "trunk": f"{STUDY_DIR}/reference/train_trunk.f32"}
           if STUDY.reward_trunk_top else {}),
    output:
        model=directory(f"{STUDY_RM_DIR}/seed{{seed}}/model"),
        metrics=f"{STUDY_RM_DIR}/seed{{seed}}/metrics.jsonl",
        summary=f"{STUDY_RM_DIR}/seed{{seed}}/train_summary.json",
    params:
        **reward_model_params(PLAN.study_reward_cfg, lambda w: f"{STUDY_DIR}/checkpoints/reward_model_seed{w.seed}",
                              STUDY.reward_trunk_top),
        launch=launcher("training"),
    threads: STUDY.reward_training["threads"]
    # the RSO family's chain is the study's longest: before the other runs' trainings (priority 1)
    priority: 2
    log:
        "logs/study_train_reward_model/seed{seed}.log",


use rule rso_candidates as study_rso_candidates with:
    input:
        ref=f"{RESULTS}/models/base",
        pairs=f"{STUDY_DIR}/data/train.jsonl",
    output:
        f"{STUDY_RSO_DIR}/{{rso}}/candidates.jsonl",
    wildcard_constraints:
        rso=STUDY_RSO_NAMES,
    params:
        **rso_candidates_params(study_sampling),
    priority: 2
    log:
        "logs/study_rso_candidates/{rso}.log",


use rule rso_gold as study_rso_gold with:
    input:
        pairs=f"{STUDY_DIR}/data/train.jsonl",
        samples=f"{STUDY_RSO_DIR}/{{rso}}/candidates.jsonl",
    output:
        f"{STUDY_RSO_DIR}/{{rso}}/gold.jsonl",
    wildcard_constraints:
        rso=STUDY_RSO_NAMES,
    log:
        "logs/study_rso_gold/{rso}.log",


use rule rso_scores as study_rso_scores with:
    input:
        models=[f"{STUDY_RM_DIR}/seed{s}/model" for s in RM_SEEDS],
        base=f"{RESULTS}/models/base",
        samples=f"{STUDY_RSO_DIR}/{{rso}}/candidates.jsonl",
    output:
        [f"{STUDY_RSO_DIR}/{{rso}}/scores/seed{s}.jsonl" for s in RM_SEEDS],
    wildcard_constraints:
        rso=STUDY_RSO_NAMES,
    params:
        **rso_scores_params(STUDY.reward_training),
    priority: 2
    log:
        "logs/study_rso_scores/{rso}.log",


use rule rso_pairs as study_rso_pairs with:
    input:
        unpack(rso_reward_inputs(study_sampling, STUDY_RSO_DIR, STUDY.data)),
        samples=f"{STUDY_RSO_DIR}/{{rso}}/candidates.jsonl",
        pairs=f"{STUDY_DIR}/data/train.jsonl",
    output:
        pairs=f"{STUDY_RSO_DIR}/{{rso}}/train.jsonl",
        summary=f"{STUDY_RSO_DIR}/{{rso}}/summary.json",
    wildcard_constraints:
        rso=STUDY_RSO_NAMES,
    params:
        **rso_pairs_params(study_sampling),
    log:
        "logs/study_rso_pairs/{rso}.log",


use rule reference_logps as study_rso_reference_logps with:
    # the base model's log-probs of the family's pairs, tokenised as the study's (study_reference_logps')
    input:
        ref=f"{RESULTS}/models/base",
        train=f"{STUDY_RSO_DIR}/{{rso}}/train.jsonl",
    output:
        logps=f"{STUDY_RSO_DIR}/{{rso}}/train_logps.pt",
        **({"trunk": f"{STUDY_RSO_DIR}/{{rso}}/train_trunk.f32"} if STUDY.trunk_top else {}),
    wildcard_constraints:
        rso=STUDY_RSO_NAMES,
    params:
        **reference_params(STUDY.training, STUDY.data, STUDY.trunk_top),
    log:
        "logs/study_rso_reference_logps/{rso}.log",
