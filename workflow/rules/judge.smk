rule judge_table1:
    input:
        a=f"{RESULTS}/generations/table1/{{a}}.jsonl",
        b=f"{RESULTS}/generations/table1/{{b}}.jsonl",
        prompts=f"{RESULTS}/data/prompts_test.jsonl",
    output:
        f"{RESULTS}/judgments/table1/{{a}}_vs_{{b}}.jsonl",
    wildcard_constraints:
        a="|".join(MODELS),
        b="|".join(MODELS),
    params:
        args=lambda w: as_json({
            "model_a": w.a, "model_b": w.b, "answers_a": f"{RESULTS}/generations/table1/{w.a}.jsonl",
            "answers_b": f"{RESULTS}/generations/table1/{w.b}.jsonl",
            "prompts_path": f"{RESULTS}/data/prompts_test.jsonl", "judge": config["table1"]["judge"],
            "out": f"{RESULTS}/judgments/table1/{w.a}_vs_{w.b}.jsonl"}),
    log:
        "logs/judge_table1/{a}_vs_{b}.log",
    shell:
        "python -m eval judge-table1 --args {params.args:q} 2>&1 | tee {log}"
