rule materialise_base:
    output:
        directory(f"{RESULTS}/models/base"),
    params:
        args=lambda w, output: as_json({"source": config["base_model"]["source"], "out": output[0],
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
        # A file source's train/test files are inputs, so editing one in place re-runs this rule.
        **(config["data"]["splits"] if config["data"]["source"] == "file" else {}),
    output:
        train=f"{RESULTS}/data/train.jsonl",
        test=f"{RESULTS}/data/test.jsonl",
        prompts=f"{RESULTS}/data/prompts_test.jsonl",
        summary=f"{RESULTS}/data/summary.json",
        # every sampled response of the synthetic source (resumable while it is samples.jsonl.partial)
        **({"samples": f"{RESULTS}/data/samples.jsonl"} if config["data"]["source"] == "synthetic:verifiable" else {}),
    params:
        # check_gold_meta: Table 1's gold judge needs every test prompt's verifiable instructions; only a
        # hub/file source can lack them, and only there is it a parameter, so switching the judge of the
        # synthetic data does not re-run this rule (and with it every training job).
        args=lambda w, input, output: as_json({
            "data_cfg": config["data"], "base_dir": input.base, "seed": config["seed"], **dict(output.items()),
            "check_gold_meta": config["table1"]["judge"]["kind"] == "gold"
                               and config["data"]["source"] != "synthetic:verifiable"}),
    threads: config["data"]["synthetic"]["threads"]
    resources:
        **res("data"),
    log:
        "logs/make_data/data.log",
    shell:
        "python -m rpo make-data --threads {threads} --args {params.args:q} 2>&1 | tee {log}"
