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
        # the llamacpp backend samples the synthetic source's responses from the base model's GGUF
        **(gguf_base_input(f"{RESULTS}/models/base") if config["data"]["source"] == "synthetic:verifiable" else {}),
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
        **job_params(
            lambda w: {**data_settings(config["data"]), "seed": config["seed"],
                       # Table 1 asks the dataset's prompt string: every held-out row must carry one (only then a
                       # parameter, so the default's make_data keeps its parameters)
                       **({"require_dataset_prompt": True} if config["table1"]["prompt"] == "dataset_prompt" else {}),
                       "check_gold_meta": config["table1"]["judge"]["kind"] == "gold"
                                          and config["data"]["source"] != "synthetic:verifiable",
                       **(sampler_backend() if config["data"]["source"] == "synthetic:verifiable" else {})},
            lambda w, input, output: {"base_dir": input.base, **dict(output.items()), **gguf_arg(input)}),
    threads: config["data"]["synthetic"]["threads"]
    resources:
        **res("data"),
    log:
        "logs/make_data/data.log",
    shell:
        "python -m rpo make-data --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"
