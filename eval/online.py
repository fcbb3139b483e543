"""The online study's table and figure (issue 27): gold and proxy against the KL from the reference, per round and
method, pooled over seeds.

Input: per run (a method and a seed) the reference's records (round 0) and every round's (rpo.rounds.evaluate_round:
kinds kl, gold and proxy), and its spec. The per-seed intervals and the pooled ones (the hierarchical bootstrap over
seeds and prompts) are eval.overoptimization's, on the same kind of records. Output: results/online.csv, one tidy
row per (method, seed, round, metric) with columns COLUMNS, and results/figures/online.png.

Metrics of a round (held-out prompts):
    kl             mean over prompts of the sampled log π − log π_ref (nats)
    gold_score     mean gold score of the greedy answers (0..1)
    gold_win_rate  % of prompts where the greedy answer's gold score beats the reference's (ties half)
    proxy_score    mean labeller score of the greedy answers: what the rounds optimise (the gold offline, so
                   then equal to gold_score; a reward model's or a judge's score at scale)
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from eval import overoptimization as ov
from rpo import io

METRICS = ("kl", "gold_score", "gold_win_rate", "proxy_score")
COLUMNS = ("method", "loss", "hparams", "labeller", "selection", "reference", "extrapolation", "seed", "round", "kl",
           "kl_se", "metric", "value", "ci_low", "ci_high", "n")
POOLED = ov.POOLED


def _hparams(h: dict) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(h.items()))


def online_rows(loaded: list[dict], *, n_boot: int, seed: int, ci: float) -> list[dict]:
    """Rows of every method (spec + records of each of its seeds): eval.overoptimization.study_rows on the online
    metrics, in the online columns (round = its step)."""
    specs = {}
    for r in loaded:
        s = r["spec"]
        specs[s["name"]] = s
    rows = ov.study_rows([{"spec": {**r["spec"], "label_noise": None}, "records": r["records"]} for r in loaded],
                         n_boot=n_boot, seed=seed, ci=ci, metrics=METRICS)
    out = []
    for row in rows:
        s = specs[row["method"]]
        rounds = s["rounds"]
        out.append({"method": row["method"], "loss": s["loss"], "hparams": _hparams(s["hparams"]),
                    "labeller": rounds["labeller"]["kind"], "selection": rounds["selection"],
                    "reference": rounds["reference"], "extrapolation": rounds["extrapolation"], "seed": row["seed"],
                    "round": row["step"], **{k: row[k] for k in ("kl", "kl_se", "metric", "value", "ci_low",
                                                                 "ci_high", "n")}})
    return out


def series(rows: list[dict]) -> dict[str, dict]:
    """Per method the points to draw, in round order: pooled rows where a method has several seeds, else its one
    seed's. {method: {"rounds", "kl", "gold": [(v, lo, hi)], "proxy": [(v, lo, hi)], "win": [...]}}"""
    pooled = {r["method"] for r in rows if r["seed"] == POOLED}
    keep = [r for r in rows if (r["seed"] == POOLED) == (r["method"] in pooled)]
    by: dict[str, dict[int, dict]] = {}
    for r in keep:
        p = by.setdefault(r["method"], {}).setdefault(int(r["round"]), {"round_kl": float(r["kl"])})
        p[r["metric"]] = (float(r["value"]), float(r["ci_low"]), float(r["ci_high"]))
    out = {}
    for m, pts in by.items():
        rounds = sorted(pts)
        out[m] = {"rounds": rounds, "kl": [pts[k]["round_kl"] for k in rounds],
                  "gold": [pts[k]["gold_score"] for k in rounds], "proxy": [pts[k]["proxy_score"] for k in rounds],
                  "win": [pts[k]["gold_win_rate"] for k in rounds]}
    return out


def plot_online(rows: list[dict], out_png) -> dict:
    """Three panels on shared axes for every method: gold score vs √KL(π‖π_ref), the proxy score vs √KL, and gold
    vs proxy (methods compared at matched proxy gain); points in round order (round 0: the reference), with
    their intervals."""
    data = series(rows)
    fig = Figure(figsize=(14, 4.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for name in sorted(data):
        s = data[name]
        x = [float(np.sqrt(max(k, 0.0))) for k in s["kl"]]
        for ax, key in ((axes[0], "gold"), (axes[1], "proxy")):
            y = [p[0] for p in s[key]]
            ax.errorbar(x, y, yerr=[[p[0] - p[1] for p in s[key]], [p[2] - p[0] for p in s[key]]], marker="o",
                        capsize=2, label=name)
        axes[2].errorbar([p[0] for p in s["proxy"]], [p[0] for p in s["gold"]],
                         yerr=[[p[0] - p[1] for p in s["gold"]], [p[2] - p[0] for p in s["gold"]]], marker="o",
                         capsize=2, label=name)
    axes[0].set_ylabel("gold score (held-out greedy answers)")
    axes[1].set_ylabel("proxy: labeller score (held-out greedy answers)")
    for ax in axes[:2]:
        ax.set_xlabel("√KL(π‖π_ref)  (nats^½, sampled)")
    axes[2].set_xlabel("proxy score")
    axes[2].set_ylabel("gold score")
    axes[0].legend(fontsize=7)
    fig.suptitle("Online rounds: gold and proxy against the distance from the reference (points: rounds 0..n)")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    return data


def make_online(*, specs: list[dict], records: list[list[str]], csv_path, figure, n: int, seed: int,
                ci: float) -> list[dict]:
    """specs[i] describes run i (run, name = its method, seed, loss, hparams, rounds), records[i] its record files
    (the reference's, then each round's, in order); writes the CSV and the figure."""
    if len(specs) != len(records):
        raise ValueError(f"online: {len(specs)} run specs for {len(records)} lists of record files")
    loaded = []
    for spec, paths in zip(specs, records):
        recs = [rec for p in paths for rec in io.read_jsonl(p)]
        steps = sorted({int(r["step"]) for r in recs})
        if steps != list(range(len(paths))):
            raise ValueError(f"online: run {spec['run']}: records of rounds {steps}, expected 0..{len(paths) - 1} "
                             f"from {json.dumps([str(p) for p in paths])}")
        loaded.append({"spec": spec, "records": recs})
    rows = online_rows(loaded, n_boot=n, seed=seed, ci=ci)
    ov.write_rows(rows, csv_path, COLUMNS)
    plot_online(rows, figure)
    return rows
