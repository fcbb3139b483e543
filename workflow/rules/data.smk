rule materialise_base:
    output:
        directory(f"{RESULTS}/models/base"),
    params:
        args=as_json({"source": config["base_model"]["source"], "out": f"{RESULTS}/models/base",
                      "dtype": config["base_model"]["dtype"]}),
    threads: 2
    resources:
        **res("data"),
    log:
        "logs/materialise_base/base.log",
    shell:
        "python -m rpo materialise-model --threads {threads} --args {params.args:q} 2>&1 | tee {log}"


rule make_data:
    input:
        base=f"{RESULTS}/models/base",
    output:
        train=f"{RESULTS}/data/train.jsonl",
        test=f"{RESULTS}/data/test.jsonl",
        prompts=f"{RESULTS}/data/prompts_test.jsonl",
        summary=f"{RESULTS}/data/summary.json",
    params:
        args=as_json({"data_cfg": config["data"], "base_dir": f"{RESULTS}/models/base",
                      "out_dir": f"{RESULTS}/data", "seed": config["seed"]}),
    threads: config["data"]["synthetic"]["threads"]
    resources:
        **res("data"),
    log:
        "logs/make_data/data.log",
    shell:
        "python -m rpo make-data --threads {threads} --args {params.args:q} 2>&1 | tee {log}"
