rule materialise_base:
    output:
        directory(f"{RESULTS}/models/base"),
    params:
        **job_params(lambda w: {"source": config["base_model"]["source"], "dtype": config["base_model"]["dtype"]},
                     lambda w, input, output: {"out": output[0]}),
    threads: 2
    resources:
        **res("data"),
    log:
        "logs/materialise_base/base.log",
    shell:
        "python -m rpo materialise-model --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule make_data:
    input:
        **data_inputs(config["data"]),
    output:
        **data_outputs(f"{RESULTS}/data", config["data"]),
    params:
        **data_params(config["data"], gold_judge=config["table1"]["judge"]["kind"] == "gold",
                      dataset_prompt=config["table1"]["prompt"] == "dataset_prompt"),
    threads: config["data"]["synthetic"]["threads"]
    resources:
        **res("data"),
    log:
        "logs/make_data/data.log",
    shell:
        "python -m rpo make-data --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"
