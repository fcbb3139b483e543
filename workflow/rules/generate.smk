def _policy_input(wildcards):
    d = get_policy_dir(wildcards.model)
    return [d] if d else []


rule generate_table1:
    input:
        ref=get_ref_dir(),
        prompts=f"{RESULTS}/data/prompts_test.jsonl",
        policy=_policy_input,
    output:
        f"{RESULTS}/generations/table1/{{model}}.jsonl",
    params:
        args=lambda w: as_json({
            "model_name": w.model, "ref_dir": get_ref_dir(), "policy_dir": get_policy_dir(w.model),
            "prompts_path": f"{RESULTS}/data/prompts_test.jsonl",
            "out": f"{RESULTS}/generations/table1/{w.model}.jsonl", "seed": config["seed"],
            **{k: v for k, v in config["table1"]["generation"].items() if k != "threads"}}),
    threads: config["table1"]["generation"]["threads"]
    log:
        "logs/generate_table1/{model}.log",
    shell:
        "python -m eval generate-table1 --threads {threads} --args {params.args:q} 2>&1 | tee {log}"
