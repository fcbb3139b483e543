# EleutherAI's lm-evaluation-harness on every model (eval/harness.py), when lm_eval.enabled:
#   make_lm_eval_ifeval      an offline IFEval task (the harness's ifeval on the held-out, or all packaged, prompts)
#   check_lm_eval_datasets   the hub tasks' datasets, resolved before any model job (fails naming the task)
#   run_lm_eval              simple_evaluate per model -> results/lm_eval/<model>/ (the harness's own files)
#   score_lm_eval            its tidy rows -> results/scores/lm_eval/<model>.json (into table1.csv)
from eval.harness import LOCAL_IFEVAL, LOCAL_TASKS

LM_EVAL = config["lm_eval"]
# each task with its few-shot count resolved (its own, else lm_eval.num_fewshot, else the task's default)
LM_EVAL_TASKS = [{"name": t["name"], "num_fewshot": t["num_fewshot"] if t["num_fewshot"] is not None
                  else LM_EVAL["num_fewshot"]} for t in LM_EVAL["tasks"]]
LM_EVAL_LOCAL = sorted({t["name"] for t in LM_EVAL_TASKS} & LOCAL_TASKS)  # tasks whose data make_lm_eval_ifeval writes
LM_EVAL_HUB = [t for t in LM_EVAL_TASKS if t["name"] not in LOCAL_TASKS]
LM_EVAL_TASK_DIR = f"{RESULTS}/data/lm_eval"
LM_EVAL_DATASETS = f"{LM_EVAL_TASK_DIR}/hub_datasets.json"
LM_EVAL_SCORES = [f"{RESULTS}/scores/lm_eval/{m}.json" for m in MODELS] if LM_EVAL["enabled"] else []



rule make_lm_eval_ifeval:
    # ifeval_heldout: the held-out IFEval prompts (checked against the training prompts); ifeval_packaged: all
    # 541 packaged ones (for data that is not IFEval's)
    input:
        unpack(lambda w: {"prompts": f"{RESULTS}/data/prompts_test.jsonl", "train": f"{RESULTS}/data/train.jsonl"}
               if w.task == LOCAL_IFEVAL else {}),
    output:
        **local_task_files("{task}"),
    wildcard_constraints:
        task="|".join(sorted(LOCAL_TASKS)),
    params:
        **job_params(
            lambda w: {"task": w.task, "prompts_file": config["data"]["synthetic"]["prompts_file"]},
            lambda w, input, output: {"prompts_test": input.get("prompts"), "train": input.get("train"),
                                      "out_yaml": output.yaml, "out_data": output.data, "out_summary": output.summary}),
    resources:
        **res("cpu"),
    log:
        "logs/make_lm_eval_ifeval/{task}.log",
    shell:
        "python -m eval make-lm-eval-ifeval --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule check_lm_eval_datasets:
    # No inputs: it runs in the first wave of jobs, so a missing hub dataset stops the run at its start.
    # A local rule: it needs the hub, which the submitting host has.
    output:
        LM_EVAL_DATASETS,
    params:
        **job_params(lambda w: {"tasks": LM_EVAL_HUB}, lambda w, input, output: {"out": output[0]}),
    localrule: True
    log:
        "logs/check_lm_eval_datasets/datasets.log",
    shell:
        "python -m eval check-lm-eval --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule run_lm_eval:
    input:
        unpack(gguf_inputs),
        ref=lambda w: get_base_dir(w.model),
        policy=_policy_input,
        tasks=lm_eval_task_inputs,
    output:
        directory(f"{RESULTS}/lm_eval/{{model}}"),
    params:
        **job_params(
            lambda w: {"model_name": w.model, "tasks": LM_EVAL_TASKS,
                       "include_path": LM_EVAL_TASK_DIR if LM_EVAL_LOCAL else None,
                       "backend": generation_backend(w.model)["backend"], "seed": config["seed"],
                       **{k: LM_EVAL[k] for k in ("limit", "batch_size", "max_gen_toks", "apply_chat_template",
                                                  "fewshot_as_multiturn", "bootstrap_iters", "dtype")}},
            lambda w, input, output: {"ref_dir": input.ref, "policy_dir": policy_of(input), "out_dir": output[0],
                                      **gguf_paths(input)}),
    threads: LM_EVAL["threads"]
    resources:
        **res("generation"),
    log:
        "logs/run_lm_eval/{model}.log",
    shell:
        "python -m eval run-lm-eval --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule score_lm_eval:
    input:
        f"{RESULTS}/lm_eval/{{model}}",
    output:
        f"{RESULTS}/scores/lm_eval/{{model}}.json",
    params:
        **job_params(lambda w: {"model_name": w.model},
                     lambda w, input, output: {"results_dir": input[0], "out": output[0]}),
    resources:
        **res("cpu"),
    log:
        "logs/score_lm_eval/{model}.log",
    shell:
        "python -m eval score-lm-eval --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"
