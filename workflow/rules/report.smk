JUDGMENTS = [f"{RESULTS}/judgments/table1/{a}_vs_{b}.jsonl" for a, b in get_table1_pairs()]
LOGPS_METRICS = {m: f"{RESULTS}/train/{m}/metrics.jsonl" for m in config["figures"]["logps_methods"]}


rule make_table1:
    input:
        judgments=JUDGMENTS,
        metrics=list(LOGPS_METRICS.values()),
    output:
        csv=f"{RESULTS}/table1.csv",
        md=f"{RESULTS}/table1.md",
        figure=f"{RESULTS}/figures/logps_chosen.png",
    params:
        args=as_json({"judgments": JUDGMENTS, "out_csv": f"{RESULTS}/table1.csv",
                      "out_md": f"{RESULTS}/table1.md", "metrics": LOGPS_METRICS,
                      "figure": f"{RESULTS}/figures/logps_chosen.png", "labels": config["table1"]["labels"],
                      "pair_order": config["table1"]["pairs"], "bootstrap": config["table1"]["bootstrap"]}),
    log:
        "logs/make_table1/table1.log",
    shell:
        "python -m eval make-table1 --args {params.args:q} 2>&1 | tee {log}"
