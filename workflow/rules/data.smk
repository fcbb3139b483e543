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


def data_files():
    """A file source's train/test files: inputs of make_data, so editing one in place re-runs it."""
    d = config["data"]
    return {split: d["splits"][split] for split in ("train", "test") if d["splits"].get(split)} if d["source"] == "file" else {}


def data_outputs():
    out = {name: f"{RESULTS}/data/{name}.jsonl" for name in ("train", "test")}
    out["prompts"] = f"{RESULTS}/data/prompts_test.jsonl"
    out["summary"] = f"{RESULTS}/data/summary.json"
    if config["data"]["source"] == "synthetic:verifiable":
        out["samples"] = f"{RESULTS}/data/samples.jsonl"  # every sampled response (resumable while partial)
    return out


def check_gold_meta():
    """Whether make_data must check that every test prompt carries the gold judge's instructions: when
    Table 1's judge is gold and the data is not the synthetic source (whose prompts always carry them).
    Only then is it a parameter, so switching the judge of synthetic data does not re-run the data step
    (and with it every training job)."""
    return config["table1"]["judge"]["kind"] == "gold" and config["data"]["source"] != "synthetic:verifiable"


rule make_data:
    input:
        base=f"{RESULTS}/models/base",
        **data_files(),
    output:
        **data_outputs(),
    params:
        args=lambda w, input, output: as_json({
            "data_cfg": config["data"], "base_dir": input.base, "seed": config["seed"],
            "check_gold_meta": check_gold_meta(), **dict(output.items())}),
    threads: config["data"]["synthetic"]["threads"]
    resources:
        **res("data"),
    log:
        "logs/make_data/data.log",
    shell:
        "python -m rpo make-data --threads {threads} --args {params.args:q} 2>&1 | tee {log}"
