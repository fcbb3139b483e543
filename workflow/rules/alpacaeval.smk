# AlpacaEval 2.0 (eval/alpacaeval/): model_outputs.json -> alpaca_eval's annotations -> the score rows of Table 2.
# One benchmark, one rule file: its rules' commands are eval/alpacaeval/stages.py's, its entry eval/registry.py's.


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


rule judge_alpacaeval:
    input:
        f"{RESULTS}/alpacaeval/{{model}}/model_outputs.json",
    output:
        annotations=f"{RESULTS}/alpacaeval/{{model}}/annotations.json",
        # alpaca_eval's annotator config (its prompt, our judge's client): kept beside the annotations
        annotator=directory(f"{RESULTS}/alpacaeval/{{model}}/annotator"),
        calls=f"{JUDGE_CALLS}/alpacaeval/{{model}}.json",
    params:
        **job_params(
            lambda w: {"judge": bench_judge("alpacaeval")},
            lambda w, input, output: {"outputs": input[0], "out": output.annotations,
                                      "annotator_dir": output.annotator, "calls_out": output.calls}),
    threads: judge_threads(bench_judge("alpacaeval"))
    resources:
        **res("judge"),
    log:
        "logs/judge_alpacaeval/{model}.log",
    shell:
        "python -m eval judge-alpacaeval --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule score_alpacaeval:
    input:
        f"{RESULTS}/alpacaeval/{{model}}/annotations.json",
    output:
        f"{RESULTS}/scores/alpacaeval/{{model}}.json",
    params:
        **job_params(
            lambda w: {"model_name": w.model, "judge_label": get_judge_label(bench_judge("alpacaeval")),
                       "precomputed_dir": config["benchmarks"]["alpacaeval"]["precomputed_dir"],
                       "lc_win_rate": config["benchmarks"]["alpacaeval"]["lc_win_rate"],
                       "bootstrap": config["benchmarks"]["bootstrap"]},
            lambda w, input, output: {"annotations": input[0], "out": output[0]}),
    resources:
        **res("cpu"),
    log:
        "logs/score_alpacaeval/{model}.log",
    shell:
        "python -m eval score-alpacaeval --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"
