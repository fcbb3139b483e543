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


rule judge_validity:
    # the LLM judge against the gold verdicts on Table 1's answer pairs (eval/judging/validity.py)
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
