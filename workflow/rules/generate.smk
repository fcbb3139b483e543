rule generate_table1:
    input:
        unpack(gguf_inputs),
        ref=lambda w: get_base_dir(w.model),
        prompts=f"{RESULTS}/data/prompts_test.jsonl",
        policy=_policy_input,
    output:
        f"{RESULTS}/generations/table1/{{model}}.jsonl",
    params:
        **job_params(
            # a further seed's run also samples with its own seed (at temperature > 0)
            lambda w: {"model_name": w.model, "seed": config["seed"] + SEEDS.index(run_seed(w.model)),
                       "protocol": config["table1"]["protocol"],  # which prompts: paper = the first n_prompts
                       "prompt": config["table1"]["prompt"],  # which question of each: the judge is shown the same
                       **{k: v for k, v in config["table1"]["generation"].items() if k != "threads"},
                       **generation_backend(w.model)},
            lambda w, input, output: {"ref_dir": input.ref, "policy_dir": policy_of(input),
                                      "prompts_path": input.prompts, "out": output[0], **gguf_paths(input)}),
    threads: config["table1"]["generation"]["threads"]
    resources:
        **res("generation"),
    log:
        "logs/generate_table1/{model}.log",
    shell:
        "python -m eval generate-table1 --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"
