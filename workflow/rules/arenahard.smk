# Arena-Hard (eval/arenahard/): model_answer -> model_judgment (two games a question) -> the score rows of Table 2.
# One benchmark, one rule file: its rules' commands are eval/arenahard/stages.py's, its entry eval/registry.py's.


rule generate_arenahard:
    input:
        unpack(gguf_inputs),
        ref=lambda w: get_base_dir(w.model),
        policy=_policy_input,
    output:
        f"{RESULTS}/arenahard/model_answer/{{model}}.jsonl",
    params:
        **bench_gen_params("arenahard", version=config["benchmarks"]["arenahard"]["version"],
                           category=config["benchmarks"]["arenahard"]["category"], **bench_subset("arenahard"),
                           **bench_decoding("arenahard")),
    threads: config["benchmarks"]["threads"]
    resources:
        **res("generation"),
    log:
        "logs/generate_arenahard/{model}.log",
    shell:
        "python -m eval generate-arenahard --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule judge_arenahard:
    input:
        f"{RESULTS}/arenahard/model_answer/{{model}}.jsonl",
    output:
        judgments=f"{RESULTS}/arenahard/model_judgment/{{model}}.jsonl",
        calls=f"{JUDGE_CALLS}/arenahard/{{model}}.json",
    params:
        **job_params(
            lambda w: {"model_name": w.model, "judge": bench_judge("arenahard"),
                       "version": config["benchmarks"]["arenahard"]["version"],
                       "category": config["benchmarks"]["arenahard"]["category"],
                       "n_questions": config["benchmarks"]["arenahard"]["n_questions"],
                       "judge_max_tokens": config["benchmarks"]["arenahard"]["judge_max_tokens"],
                       **bench_subset("arenahard")},
            lambda w, input, output: {"answers": input[0], "out": output.judgments, "calls_out": output.calls}),
    threads: judge_threads(bench_judge("arenahard"))
    resources:
        **res("judge"),
    log:
        "logs/judge_arenahard/{model}.log",
    shell:
        "python -m eval judge-arenahard --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule score_arenahard:
    input:
        f"{RESULTS}/arenahard/model_judgment/{{model}}.jsonl",
    output:
        f"{RESULTS}/scores/arenahard/{{model}}.json",
    params:
        **job_params(
            lambda w: {"model_name": w.model, "judge_label": get_judge_label(bench_judge("arenahard")),
                       "version": config["benchmarks"]["arenahard"]["version"],
                       "category": config["benchmarks"]["arenahard"]["category"],
                       "bootstrap": config["benchmarks"]["bootstrap"]},
            lambda w, input, output: {"judgments": input[0], "out": output[0]}),
    resources:
        **res("cpu"),
    log:
        "logs/score_arenahard/{model}.log",
    shell:
        "python -m eval score-arenahard --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


PAPER_SERIES = config["paper"]["series"]
