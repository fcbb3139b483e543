JUDGMENTS = [f"{RESULTS}/judgments/table1/{a}_vs_{b}.jsonl" for a, b in get_table1_pairs()]
CALLS = [f"{JUDGE_CALLS}/table1/{a}_vs_{b}.json" for a, b in get_table1_pairs()] + [
    f"{JUDGE_CALLS}/{b}/{m}.json" for b in BENCHMARKS for m in MODELS]
SCORES = [f"{RESULTS}/scores/{b}/{m}.json" for b in BENCHMARKS for m in MODELS] + LM_EVAL_SCORES  # lm_eval.smk


rule resolved_config:
    # The config as this run resolved it (defaults filled), for the report and for the record.
    output:
        report(f"{RESULTS}/config.resolved.yaml", category="Configuration", caption="../report/config.rst"),
    params:
        **job_params(lambda w: {"config": config}, lambda w, input, output: {"out": output[0]}),
    localrule: True
    log:
        "logs/resolved_config/config.log",
    shell:
        "python -m rpo write-config --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"


rule make_table1:
    input:
        resolved_config=f"{RESULTS}/config.resolved.yaml",
        judgments=JUDGMENTS,
        calls=CALLS,
        validity=VALIDITY,  # judge_validity.csv when enabled: Table 2's judge's agreement with gold, printed beside it
        metrics=[TRAIN_METRICS.format(method=m) for m in METHODS],
        scores=SCORES,
    output:
        csv=report(f"{RESULTS}/table1.csv", category="Tables", caption="../report/table1.rst"),
        md=f"{RESULTS}/table1.md",
        figure=report(f"{RESULTS}/figures/logps_chosen.png", category="Figures", caption="../report/figure.rst"),
        raw_figure=f"{RESULTS}/figures/logps_chosen_raw.png",
        methods=report(f"{RESULTS}/figures/methods.png", category="Figures", caption="../report/methods.rst"),
        # the paper's numbers beside ours, when the config names a paper series
        comparison=[report(f"{RESULTS}/paper_comparison.csv", category="Tables", caption="../report/comparison.rst"),
                    f"{RESULTS}/paper_comparison.md"] if PAPER_SERIES else [],
    params:
        **job_params(
            lambda w: {"paper_series": PAPER_SERIES, "labels": config["table1"]["labels"],
                       "pair_order": config["table1"]["pairs"], "bootstrap": config["table1"]["bootstrap"],
                       **({"seed_pairs": seed_pairs()} if seed_pairs() else {})},
            lambda w, input, output: {
                "judgments": list(input.judgments), "scores": list(input.scores), "judge_calls": list(input.calls),
                "validity": input.validity[0] if input.validity else None,
                "metrics": {m: TRAIN_METRICS.format(method=m) for m in config["figures"]["logps_methods"]},
                "methods_metrics": {m: TRAIN_METRICS.format(method=m) for m in METHODS},
                "out_csv": output.csv, "out_md": output.md, "figure": output.figure,
                "raw_figure": output.raw_figure, "methods_figure": output.methods,
                "comparison": list(output.comparison) or None}),
    resources:
        **res("cpu"),
    log:
        "logs/make_table1/table1.log",
    shell:
        "python -m eval make-table1 --args {params.settings:q} --paths {params.paths:q} 2>&1 | tee {log}"
