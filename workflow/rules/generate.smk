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


rule generate_mtbench:
    input:
        unpack(gguf_inputs),
        ref=lambda w: get_base_dir(w.model),
        policy=_policy_input,
    output:
        f"{RESULTS}/mtbench/model_answer/{{model}}.jsonl",
    params:
        **bench_gen_params("mtbench", **mtbench_template()),
    threads: config["benchmarks"]["threads"]
    resources:
        **res("generation"),
    log:
        "logs/generate_mtbench/{model}.log",
    shell:
        "python -m eval generate-mtbench --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule generate_alpacaeval:
    input:
        unpack(gguf_inputs),
        ref=lambda w: get_base_dir(w.model),
        policy=_policy_input,
    output:
        f"{RESULTS}/alpacaeval/{{model}}/model_outputs.json",
    params:
        **bench_gen_params("alpacaeval", **bench_subset("alpacaeval"), **bench_decoding("alpacaeval"),
                           prompt_template=config["benchmarks"]["alpacaeval"]["prompt_template"]),
    threads: config["benchmarks"]["threads"]
    resources:
        **res("generation"),
    log:
        "logs/generate_alpacaeval/{model}.log",
    shell:
        "python -m eval generate-alpacaeval --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule generate_arenahard:
    input:
        unpack(gguf_inputs),
        ref=lambda w: get_base_dir(w.model),
        policy=_policy_input,
    output:
        f"{RESULTS}/arenahard/model_answer/{{model}}.jsonl",
    params:
        **bench_gen_params("arenahard", version=config["benchmarks"]["arenahard"]["version"],
                           category=config["benchmarks"]["arenahard"]["category"], **bench_subset("arenahard"),
                           **bench_decoding("arenahard")),
    threads: config["benchmarks"]["threads"]
    resources:
        **res("generation"),
    log:
        "logs/generate_arenahard/{model}.log",
    shell:
        "python -m eval generate-arenahard --threads {threads} --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"
