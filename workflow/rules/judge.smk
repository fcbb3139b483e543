rule judge_table1:
    input:
        a=f"{RESULTS}/generations/table1/{{a}}.jsonl",
        b=f"{RESULTS}/generations/table1/{{b}}.jsonl",
        prompts=f"{RESULTS}/data/prompts_test.jsonl",
    output:
        judgments=f"{RESULTS}/judgments/table1/{{a}}_vs_{{b}}.jsonl",
        calls=f"{JUDGE_CALLS}/table1/{{a}}_vs_{{b}}.json",
    wildcard_constraints:
        a=MODEL_NAMES,
        b=MODEL_NAMES,
    params:
        **job_params(
            lambda w: {"model_a": w.a, "model_b": w.b, "judge": config["table1"]["judge"],
                       "protocol": config["table1"]["protocol"], "prompt": config["table1"]["prompt"],
                       "judge_max_tokens": config["table1"]["judge_max_tokens"]},
            lambda w, input, output: {"answers_a": input.a, "answers_b": input.b, "prompts_path": input.prompts,
                                      "out": output.judgments, "calls_out": output.calls}),
    threads: judge_threads(config["table1"]["judge"])
    resources:
        **res("judge"),
    log:
        "logs/judge_table1/{a}_vs_{b}.log",
    shell:
        "python -m eval judge-table1 --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


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


rule judge_alpacaeval:
    input:
        f"{RESULTS}/alpacaeval/{{model}}/model_outputs.json",
    output:
        annotations=f"{RESULTS}/alpacaeval/{{model}}/annotations.json",
        # alpaca_eval's annotator config (its prompt, our judge's client): kept beside the annotations
        annotator=directory(f"{RESULTS}/alpacaeval/{{model}}/annotator"),
        calls=f"{JUDGE_CALLS}/alpacaeval/{{model}}.json",
    params:
        **job_params(
            lambda w: {"judge": bench_judge("alpacaeval")},
            lambda w, input, output: {"outputs": input[0], "out": output.annotations,
                                      "annotator_dir": output.annotator, "calls_out": output.calls}),
    threads: judge_threads(bench_judge("alpacaeval"))
    resources:
        **res("judge"),
    log:
        "logs/judge_alpacaeval/{model}.log",
    shell:
        "python -m eval judge-alpacaeval --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


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


rule judge_validity:
    # the LLM judge against the gold verdicts on Table 1's answer pairs (eval/judge_validity.py)
    input:
        answers=[f"{RESULTS}/generations/table1/{m}.jsonl" for m in VALIDITY_MODELS],
        prompts=f"{RESULTS}/data/prompts_test.jsonl",
    output:
        csv=f"{RESULTS}/judge_validity.csv",
        jsonl=f"{RESULTS}/judge_validity.jsonl",
    params:
        **job_params(
            lambda w: {"judge": validity_judge(), "pairs": VALIDITY_PAIRS,
                       "constrain": config["judge_validity"]["constrain"],
                       "n_prompts": config["judge_validity"]["n_prompts"], "prompt": config["table1"]["prompt"],
                       "judge_max_tokens": config["judge_validity"]["judge_max_tokens"],
                       "bootstrap": config["table1"]["bootstrap"]},
            lambda w, input, output: {"answers": dict(zip(VALIDITY_MODELS, input.answers)),
                                      "prompts_path": input.prompts, "out_csv": output.csv,
                                      "out_jsonl": output.jsonl}),
    threads: judge_threads(validity_judge())
    resources:
        **res("judge"),
    log:
        "logs/judge_validity/judge_validity.log",
    shell:
        "python -m eval judge-validity --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"
