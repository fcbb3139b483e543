rule train_sft:
    input:
        base=f"{RESULTS}/models/base",
        train=f"{RESULTS}/data/train.jsonl",
    output:
        model=directory(f"{RESULTS}/models/sft/model"),
        metrics=f"{RESULTS}/models/sft/metrics.jsonl",
    params:
        args=as_json({"base_dir": f"{RESULTS}/models/base", "pairs_path": f"{RESULTS}/data/train.jsonl",
                      "out_dir": f"{RESULTS}/models/sft/model", "ckpt_dir": f"{RESULTS}/checkpoints/sft",
                      "cfg": train_cfg("sft")}),
        launch=launcher("sft"),
    threads: config["sft"]["train"]["threads"]
    resources:
        **res("sft"),
    log:
        "logs/train_sft/sft.log",
    shell:
        "{params.launch} train-sft --threads {threads} --args {params.args:q} 2>&1 | tee {log}"


rule reference_logps:
    # Once per (reference model, data, tokenisation): every method and every eta reuses this file.
    input:
        ref=get_ref_dir(),
        train=f"{RESULTS}/data/train.jsonl",
    output:
        f"{RESULTS}/reference/train_logps.pt",
    params:
        args=as_json({"model_dir": get_ref_dir(), "pairs_path": f"{RESULTS}/data/train.jsonl",
                      "out_path": f"{RESULTS}/reference/train_logps.pt",
                      "max_length": config["training"]["max_length"],
                      "max_prompt_length": config["training"]["max_prompt_length"],
                      "batch_size": config["reference"]["batch_size"],
                      "dtype": config["training"]["precision"]}),
    threads: config["reference"]["threads"]
    resources:
        **res("reference"),
    log:
        "logs/reference_logps/train.log",
    shell:
        "python -m rpo reference-logps --threads {threads} --args {params.args:q} 2>&1 | tee {log}"


rule train_preference:
    input:
        ref=get_ref_dir(),
        train=f"{RESULTS}/data/train.jsonl",
        cache=f"{RESULTS}/reference/train_logps.pt",
    output:
        model=directory(f"{RESULTS}/train/{{method}}/model"),
        metrics=f"{RESULTS}/train/{{method}}/metrics.jsonl",
    params:
        args=lambda w: as_json({
            "ref_dir": get_ref_dir(), "pairs_path": f"{RESULTS}/data/train.jsonl",
            "reference_cache": f"{RESULTS}/reference/train_logps.pt",
            "out_dir": f"{RESULTS}/train/{w.method}/model", "ckpt_dir": f"{RESULTS}/checkpoints/{w.method}",
            "cfg": train_cfg("training"), "method": {"name": w.method, **config["methods"][w.method]}}),
        launch=launcher("training"),
    threads: config["training"]["threads"]
    resources:
        **res("training"),
    log:
        "logs/train_preference/{method}.log",
    shell:
        "{params.launch} train-preference --threads {threads} --args {params.args:q} 2>&1 | tee {log}"
