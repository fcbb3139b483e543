# MT-Bench (eval/mtbench/): FastChat's model_answer -> model_judgment -> the score rows of Table 2.
# One benchmark, one rule file: its rules' commands are eval/mtbench/stages.py's, its entry eval/registry.py's.


rule generate_mtbench:
    input:
        unpack(gguf_inputs),
        ref=lambda w: get_base_dir(w.model),
        policy=_policy_input,
    output:
        f"{RESULTS}/mtbench/model_answer/{{model}}.jsonl",
    params:
        **bench_gen_params("mtbench", **mtbench_template()),
    threads: config["benchmarks"]["threads"]
    resources:
        **res("generation"),
    log:
        "logs/generate_mtbench/{model}.log",
    shell:
        "python -m eval generate-mtbench --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule judge_mtbench:
    input:
        f"{RESULTS}/mtbench/model_answer/{{model}}.jsonl",
    output:
        judgments=f"{RESULTS}/mtbench/model_judgment/{{model}}_single.jsonl",
        calls=f"{JUDGE_CALLS}/mtbench/{{model}}.json",
    params:
        **job_params(
            lambda w: {"model_name": w.model, "judge": bench_judge("mtbench"),
                       "judge_max_tokens": config["benchmarks"]["mtbench"]["judge_max_tokens"],
                       "rating_attempts": config["benchmarks"]["mtbench"]["rating_attempts"]},
            lambda w, input, output: {"answers": input[0], "out": output.judgments, "calls_out": output.calls}),
    threads: judge_threads(bench_judge("mtbench"))
    resources:
        **res("judge"),
    log:
        "logs/judge_mtbench/{model}.log",
    shell:
        "python -m eval judge-mtbench --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule score_mtbench:
    input:
        f"{RESULTS}/mtbench/model_judgment/{{model}}_single.jsonl",
    output:
        f"{RESULTS}/scores/mtbench/{{model}}.json",
    params:
        **job_params(
            lambda w: {"model_name": w.model, "judge_label": get_judge_label(bench_judge("mtbench")),
                       "bootstrap": config["benchmarks"]["bootstrap"]},
            lambda w, input, output: {"judgments": input[0], "out": output[0]}),
    resources:
        **res("cpu"),
    log:
        "logs/score_mtbench/{model}.log",
    shell:
        "python -m eval score-mtbench --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"
