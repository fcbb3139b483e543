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


rule train_sft_seed:
    # Another SFT model, with another seed: an ingredient of the soup reference (SALSA).
    input:
        base=f"{RESULTS}/models/base",
        train=f"{RESULTS}/data/train.jsonl",
    output:
        model=directory(f"{RESULTS}/models/sft_seed{{seed}}/model"),
        metrics=f"{RESULTS}/models/sft_seed{{seed}}/metrics.jsonl",
    wildcard_constraints:
        seed=r"\d+",
    params:
        args=lambda w: as_json({"base_dir": f"{RESULTS}/models/base", "pairs_path": f"{RESULTS}/data/train.jsonl",
                                "out_dir": f"{RESULTS}/models/sft_seed{w.seed}/model",
                                "ckpt_dir": f"{RESULTS}/checkpoints/sft_seed{w.seed}",
                                "cfg": {**train_cfg("sft"), "seed": int(w.seed)}}),
        launch=launcher("sft"),
    threads: config["sft"]["train"]["threads"]
    resources:
        **res("sft"),
    log:
        "logs/train_sft/sft_seed{seed}.log",
    shell:
        "{params.launch} train-sft --threads {threads} --args {params.args:q} 2>&1 | tee {log}"


rule make_soup:
    # SALSA's reference: the parameter-wise mean of SFT models trained with different seeds.
    input:
        [sft_dir(s) for s in config["sft"]["soup_seeds"]],
    output:
        directory(SOUP_DIR),
    params:
        args=as_json({"model_dirs": [sft_dir(s) for s in config["sft"]["soup_seeds"]], "out": SOUP_DIR}),
    resources:
        **res("cpu"),
    log:
        "logs/make_soup/soup.log",
    shell:
        "python -m rpo make-soup --args {params.args:q} 2>&1 | tee {log}"


rule reference_logps:
    # Once per (reference model, data, tokenisation): every method and every eta reuses this file.
    input:
        ref=lambda w: reference_dir(w.refname),
        train=f"{RESULTS}/data/train.jsonl",
    output:
        f"{RESULTS}/reference/{{refname}}/train_logps.pt",
    wildcard_constraints:
        refname="ref|soup",
    params:
        args=lambda w: as_json({"model_dir": reference_dir(w.refname), "pairs_path": f"{RESULTS}/data/train.jsonl",
                                "out_path": reference_cache(w.refname),
                                "max_length": config["training"]["max_length"],
                                "max_prompt_length": config["training"]["max_prompt_length"],
                                "batch_size": config["reference"]["batch_size"],
                                "dtype": config["training"]["precision"]}),
    threads: config["reference"]["threads"]
    resources:
        **res("reference"),
    log:
        "logs/reference_logps/{refname}.log",
    shell:
        "python -m rpo reference-logps --threads {threads} --args {params.args:q} 2>&1 | tee {log}"


rule train_preference:
    input:
        ref=lambda w: reference_dir(reference_name(w.method)),
        train=f"{RESULTS}/data/train.jsonl",
        cache=lambda w: reference_cache(reference_name(w.method)),
    output:
        model=directory(f"{RESULTS}/train/{{method}}/model"),
        metrics=f"{RESULTS}/train/{{method}}/metrics.jsonl",
    params:
        args=lambda w: as_json({
            "ref_dir": reference_dir(reference_name(w.method)), "pairs_path": f"{RESULTS}/data/train.jsonl",
            "reference_cache": reference_cache(reference_name(w.method)),
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
