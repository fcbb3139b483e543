# The overoptimization study (issue 12; docs/overoptimization.md):
#   snakemake --cores all results/overoptimization.csv
# Its own data (more prompts, label noise: overoptimization.data over data), each run of
# overoptimization.grid trained once per seed from the base model with snapshots every
# overoptimization.snapshot_every steps, every snapshot measured on the held-out prompts and pairs
# (KL to the reference, gold score and win rate, the implicit-reward proxy), then one tidy CSV and a figure.


# The study's data, reference log-probs and training are the main pipeline's rules (data.smk, train.smk) with the
# study's paths and configs (rpo.plan.Study): a change to those rules is a change to the study's too.
use rule make_data as study_data with:
    input:
        **data_inputs(STUDY.data),
    output:
        **data_outputs(f"{STUDY_DIR}/data", STUDY.data),
    params:
        # the study scores every answer with the gold verifier: every held-out prompt must carry its instructions
        **data_params(STUDY.data, gold_judge=True, dataset_prompt=False),
    threads: STUDY.data["synthetic"]["threads"]
    log:
        "logs/study_data/data.log",


use rule reference_logps as study_reference_logps with:
    input:
        ref=f"{RESULTS}/models/base",
        train=f"{STUDY_DIR}/data/train.jsonl",
    output:
        logps=f"{STUDY_DIR}/reference/train_logps.pt",
        **({"trunk": f"{STUDY_DIR}/reference/train_trunk.f32"} if STUDY.trunk_top else {}),
    params:
        **reference_params(STUDY.training, STUDY.data, STUDY.trunk_top),
    log:
        "logs/study_reference_logps/ref.log",


rule study_reference_answers:
    # the reference's greedy answers and gold scores: step 0 of every curve and the other side of its win rates
    input:
        **gguf_base_input(f"{RESULTS}/models/base"),
        ref=f"{RESULTS}/models/base",
        prompts=f"{STUDY_DIR}/data/prompts_test.jsonl",
    output:
        f"{STUDY_DIR}/reference/answers.jsonl",
    params:
        **job_params(lambda w: {"max_new_tokens": config["overoptimization"]["eval"]["max_new_tokens"],
                                "batch_size": config["overoptimization"]["eval"]["batch_size"], **sampler_backend()},
                     lambda w, input, output: {"ref_dir": input.ref, "prompts_path": input.prompts, "out": output[0],
                                               **gguf_arg(input)}),
    threads: config["overoptimization"]["eval"]["threads"]
    resources:
        **res("generation"),
    log:
        "logs/study_reference_answers/ref.log",
    shell:
        "python -m rpo reference-answers --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


use rule train_preference as study_train with:
    input:
        ref=f"{RESULTS}/models/base",
        # the study's pairs and their reference log-probs, or an RSO family's own (overopt_rso.smk)
        train=study_run_input("train.jsonl", f"{STUDY_DIR}/data/train.jsonl"),
        cache=study_run_input("train_logps.pt", f"{STUDY_DIR}/reference/train_logps.pt"),
        **({"trunk": study_run_input("train_trunk.f32", f"{STUDY_DIR}/reference/train_trunk.f32")}
           if STUDY.trunk_top else {}),
    output:
        model=directory(f"{STUDY_RUN}/model"),
        snapshots=directory(f"{STUDY_RUN}/snapshots"),
        metrics=f"{STUDY_RUN}/metrics.jsonl",
        summary=f"{STUDY_RUN}/train_summary.json",
    wildcard_constraints:
        run=STUDY_RUN_NAMES,
        seed=r"\d+",
    params:
        **preference_params(lambda w: PLAN.study_cfg(w.seed), lambda w: f"{STUDY_DIR}/checkpoints/{w.run}-seed{w.seed}",
                            lambda w: {"name": w.run, **STUDY.runs[w.run]}, STUDY.data, STUDY.trunk_top),
    threads: STUDY.training["threads"]
    # every training before any measurement: measurements become ready one at a time as trainings end, and
    # the last training alone would leave a core idle (docs/overoptimization.md: its cost)
    priority: 1
    log:
        "logs/study_train/{run}-seed{seed}.log",


rule study_evaluate:
    input:
        **gguf_base_input(f"{RESULTS}/models/base"),
        ref=f"{RESULTS}/models/base",
        snapshots=f"{STUDY_RUN}/snapshots",
        prompts=f"{STUDY_DIR}/data/prompts_test.jsonl",
        pairs=f"{STUDY_DIR}/data/test.jsonl",
        ref_answers=f"{STUDY_DIR}/reference/answers.jsonl",
    output:
        STUDY_EVAL,
    wildcard_constraints:
        run=STUDY_RUN_NAMES,
        seed=r"\d+",
    params:
        **job_params(
            lambda w: {"beta": STUDY.runs[w.run]["beta"], "max_length": STUDY.training["max_length"],
                       "max_prompt_length": STUDY.training["max_prompt_length"], "seed": int(w.seed),
                       **chat_format_param(w, STUDY.data),
                       **{k: v for k, v in config["overoptimization"]["eval"].items() if k != "threads"},
                       **sampler_backend()},
            lambda w, input, output: {"ref_dir": input.ref, "snapshots": input.snapshots,
                                      "prompts_path": input.prompts, "pairs_path": input.pairs,
                                      "ref_answers": input.ref_answers, "out": output[0], **gguf_arg(input)}),
    threads: config["overoptimization"]["eval"]["threads"]
    resources:
        **res("generation"),
    log:
        "logs/study_evaluate/{run}-seed{seed}.log",
    shell:
        "python -m rpo evaluate-snapshots --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule overoptimization:
    input:
        study_records,
    output:
        csv=f"{RESULTS}/overoptimization.csv",
        figure=report(f"{RESULTS}/figures/overoptimization.png", category="Figures"),
    params:
        **job_params(lambda w: {"specs": STUDY.specs(), **config["overoptimization"]["bootstrap"]},
                     lambda w, input, output: {"records": list(input), "csv_path": output.csv,
                                               "figure": output.figure}),
    resources:
        **res("cpu"),
    log:
        "logs/overoptimization/overoptimization.log",
    shell:
        "python -m eval overoptimization --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"
