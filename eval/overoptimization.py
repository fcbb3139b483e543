"""The overoptimization study's tables and figure (issue 12): gold quality against the distance from the
reference, per method, β and η, over training, with seed replicates.

Input: each run's item records (rpo.overopt.evaluate_snapshots) and its spec (method name, loss, its
hyperparameters, label noise, seed). Output: results/overoptimization.csv, one tidy row per
(run, seed, step, metric) with columns COLUMNS, and results/figures/overoptimization.png.

Metrics of a snapshot (items: held-out prompts, or held-out pairs for the proxy ones):
    kl                 mean over prompts of the prompt's mean sampled log π − log π_ref (nats)
    gold_score         mean gold score of the greedy answers (0..1)
    gold_win_rate      % of prompts where the answer's gold score beats the reference's (ties half)
    proxy_accuracy     % of held-out pairs the implicit reward ranks right (ties half; the pairs carry the
                       training data's label noise, as a proxy evaluator would see them)
    proxy_margin       mean implicit reward margin β·(Δ_chosen − Δ_rejected) on held-out pairs
    logratio_chosen    mean Δ_chosen = log π(y_w|x) − log π_ref(y_w|x) on held-out pairs (paper Fig. 1)
Per-seed rows (seed = the run's seed) get a percentile bootstrap over items; pooled rows (seed "pooled",
present when a run has several seeds) are the mean of the per-seed values with a hierarchical bootstrap:
each replicate draws seeds with replacement and, within each drawn seed, items with replacement, so the
interval holds seed-to-seed variation as well as prompt sampling. Every row also carries its snapshot's kl
and the kl's standard error over prompts (per seed) or over seeds (pooled).
"""
from __future__ import annotations

import csv
import math
from collections import defaultdict

import numpy as np

from eval.bootstrap import bootstrap_mean, hierarchical_bootstrap
from rpo import io

COLUMNS = ("method", "loss", "beta", "knob", "knob_value", "label_noise", "pairs", "seed", "step", "kl", "kl_se",
           "metric", "value", "ci_low", "ci_high", "n")
# `pairs`: what a run trained on: "study" (the study's pairs) or "rso" (its RSO family's rejection-sampled pairs)
POOLED = "pooled"


def item_values(records: list[dict]) -> dict[int, dict[str, dict[str, float]]]:
    """step -> metric -> {item id: value} from one run's records."""
    out: dict[int, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        step, rid = int(r["step"]), r["id"]
        if r["kind"] == "kl":
            out[step]["kl"][rid] = float(np.mean(r["values"]))
        elif r["kind"] == "gold":
            out[step]["gold_score"][rid] = float(r["gold"])
            out[step]["gold_win_rate"][rid] = 100.0 * float(r["win"])
        elif r["kind"] == "pair":
            out[step]["proxy_accuracy"][rid] = 100.0 * float(r["correct"])
            out[step]["proxy_margin"][rid] = float(r["margin"])
            out[step]["logratio_chosen"][rid] = float(r["logratio_chosen"])
        elif r["kind"] == "proxy":  # the online rounds' labeller score of the greedy answer (rpo.rounds)
            out[step]["proxy_score"][rid] = float(r["score"])
        else:
            raise ValueError(f"unknown record kind {r['kind']!r} (step {step}, id {rid})")
    return out


METRICS = ("kl", "gold_score", "gold_win_rate", "proxy_accuracy", "proxy_margin", "logratio_chosen")


def _kl_se(values) -> float:
    arr = np.asarray(values, dtype=float)
    return float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else float("nan")


def _knob(spec: dict) -> tuple[str, float | str]:
    """The method's knob beside beta: eta for RPO (and any +sft loss), else its first other hyperparameter."""
    others = [k for k in spec["hparams"] if k != "beta"]
    key = "eta" if "eta" in others else (others[0] if others else "")
    return key, spec["hparams"].get(key, "")


def study_rows(runs: list[dict], *, n_boot: int, seed: int, ci: float, metrics=METRICS) -> list[dict]:
    """The CSV rows of every run (spec + records): per seed, then pooled over a run's seeds; `metrics`: the
    metrics of item_values to report (eval.online's: kl, gold and its labeller's proxy_score)."""
    by_run: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_run[r["spec"]["name"]].append(r)
    rows = []
    for name in sorted(by_run):
        reps = sorted(by_run[name], key=lambda r: r["spec"]["seed"])
        spec = reps[0]["spec"]
        knob, knob_value = _knob(spec)
        base = {"method": name, "loss": spec["loss"], "beta": spec["hparams"].get("beta", ""), "knob": knob,
                "knob_value": knob_value, "label_noise": spec["label_noise"], "pairs": spec.get("pairs", "study")}
        values = [item_values(r["records"]) for r in reps]
        steps = sorted(set.intersection(*(set(v) for v in values)))
        for step in steps:
            per_seed_kl = []
            for rep, v in zip(reps, values):
                kl_items = list(v[step]["kl"].values())
                kl, kl_se = float(np.mean(kl_items)), _kl_se(kl_items)
                per_seed_kl.append(kl)
                for metric in metrics:
                    items = _items(v[step], metric)
                    value, lo, hi = bootstrap_mean(items, n_boot=n_boot, seed=seed, ci=ci)
                    rows.append({**base, "seed": rep["spec"]["seed"], "step": step, "kl": kl, "kl_se": kl_se,
                                 "metric": metric, "value": value, "ci_low": lo, "ci_high": hi,
                                 "n": len(items)})
            if len(reps) > 1:
                kl = float(np.mean(per_seed_kl))
                for metric in metrics:
                    groups = [_items(v[step], metric) for v in values]
                    value, lo, hi = hierarchical_bootstrap(groups, n_boot=n_boot, seed=seed, ci=ci)
                    rows.append({**base, "seed": POOLED, "step": step, "kl": kl, "kl_se": _kl_se(per_seed_kl),
                                 "metric": metric, "value": value, "ci_low": lo, "ci_high": hi,
                                 "n": sum(len(g) for g in groups)})
    return rows


def _items(step_values: dict, metric: str) -> list[float]:
    return list(step_values[metric].values())


def write_rows(rows: list[dict], path, columns: list[str] = COLUMNS) -> None:
    """The rows as CSV (floats to 6 significant digits, NaN as an empty cell), written atomically."""
    with io.atomic_open(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) and not math.isnan(r[k]) else
                            "" if isinstance(r[k], float) else r[k]) for k in columns})


def make_study(*, specs: list[dict], records: list[str], csv_path, figure, n: int, seed: int,
               ci: float) -> list[dict]:
    """specs[i] describes the run whose records file is records[i] (name, loss, hparams, label_noise, pairs, seed);
    writes the CSV and the figure."""
    if len(specs) != len(records):
        raise ValueError(f"overoptimization: {len(specs)} run specs for {len(records)} record files")
    loaded = [{"spec": spec, "records": io.read_jsonl(path)} for spec, path in zip(specs, records)]
    rows = study_rows(loaded, n_boot=n, seed=seed, ci=ci)
    write_rows(rows, csv_path)
    from eval.figures import plot_overoptimization  # matplotlib
    plot_overoptimization(rows, figure)
    return rows
