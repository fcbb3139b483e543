"""Training-curve figures from per-step metrics JSONL files.

The headline figure is the paper's Fig. 1 (right): the summed log-probability
of the chosen response during training. Under DPO it drifts down (the
over-optimisation RPO targets); the SFT term in RPO should hold it up.

Figures are drawn on a bare ``Figure`` with the Agg canvas rather than via
pyplot, so importing this module never changes the process-wide backend and
no figure leaks into pyplot's global registry inside a long Snakemake run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rpo.io import read_json_objects

REQUIRED_KEYS = ("step", "logps/chosen")


def read_metrics(path) -> list[dict]:
    """Records of a metrics JSONL file; blank lines are skipped.

    Every record must be a JSON object with ``step`` and ``logps/chosen``.
    """
    records = []
    for lineno, rec in read_json_objects(path):
        missing = [k for k in REQUIRED_KEYS if k not in rec]
        if missing:
            raise ValueError(f"{path}, line {lineno}: missing key(s) {missing}")
        records.append(rec)
    return records


def moving_average(values, window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` points; same length as input.

    The first points average what exists so far, so the smoothed curve starts
    at step one instead of being shifted right by the window.
    """
    if window < 1:
        raise ValueError(f"smooth window must be >= 1, got {window}")
    v = np.asarray(values, dtype=float)
    csum = np.concatenate([[0.0], np.cumsum(v)])
    hi = np.arange(1, v.size + 1)
    lo = np.maximum(hi - window, 0)
    return (csum[hi] - csum[lo]) / (hi - lo)


def plot_metric(
    runs: dict,
    key: str,
    out_png,
    *,
    labels: dict[str, str] | None = None,
    smooth: int = 1,
    xlabel: str = "training step",
    ylabel: str | None = None,
    title: str | None = None,
) -> dict[str, tuple[list, list]]:
    """Plot ``key`` vs ``step`` for each run; returns {run: (steps, values)}.

    runs maps a run name to its metrics JSONL. Records without ``key`` (e.g.
    interleaved eval rows) are skipped, but a run with none is an error so a
    typo in ``key`` cannot produce an empty plot. Returned values are raw.
    """
    if smooth < 1:
        raise ValueError(f"smooth window must be >= 1, got {smooth}")
    labels = labels or {}
    data: dict[str, tuple[list, list]] = {}
    for name, path in runs.items():
        recs = [r for r in read_metrics(path) if key in r]
        if not recs:
            raise ValueError(f"{path}: no records with key {key!r}")
        data[name] = ([r["step"] for r in recs], [float(r[key]) for r in recs])

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, (steps, values) in data.items():
        label = labels.get(name, name)
        if smooth > 1:
            # Raw series faintly underneath so smoothing cannot hide spikes.
            (raw,) = ax.plot(steps, values, alpha=0.25, linewidth=0.8)
            ax.plot(steps, moving_average(values, smooth), color=raw.get_color(), label=label)
        else:
            ax.plot(steps, values, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel or key)
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()

    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    return data


def plot_logps_chosen_raw(
    runs: dict,
    out_png,
    *,
    labels: dict[str, str] | None = None,
    smooth: int = 1,
) -> dict[str, tuple[list, list]]:
    """Paper Fig. 1 (right): chosen log-probability vs training step."""
    return plot_metric(
        runs,
        "logps/chosen",
        out_png,
        labels=labels,
        smooth=smooth,
        ylabel="log π(y_w|x) (summed, chosen)",
        title="Chosen log-probability during training (paper Fig. 1 right)",
    )


def plot_methods(runs: dict, rows: list[dict], out_png, *, labels: dict[str, str] | None = None,
                 smooth: int = 3, key: str = "logratio/chosen") -> dict:
    """The method-zoo view: per method, the chosen log-probability relative to the reference over training
    (left) and its final win rate against Ref with its CI (right, from table1.csv rows).

    Returns {"curves": {method: (steps, values)}, "win_rate_vs_ref": {method: (value, ci_low, ci_high)}};
    a method without a win rate against ref (pair not configured) is left out of the right panel.
    """
    labels = labels or {}
    curves = {}
    for name, path in runs.items():
        recs = [r for r in read_metrics(path) if key in r]
        if not recs:
            raise ValueError(f"{path}: no records with key {key!r}")
        curves[name] = ([r["step"] for r in recs], [float(r[key]) for r in recs])
    scores = {}
    for r in rows:
        if r["metric"] == "win_rate" and r["model_b"] == "ref" and r["model_a"] in runs:
            scores[r["model_a"]] = (float(r["value"]), float(r["ci_low"]), float(r["ci_high"]))

    fig = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(fig)
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, (steps, values) in curves.items():
        ys = moving_average(values, smooth) if smooth > 1 else values
        ax.plot(steps, ys, label=labels.get(name, name))
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("log π(y_w|x) − log π_ref(y_w|x)")
    ax.set_title("Chosen log-probability vs the reference")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    names = sorted(scores)
    if names:
        vals = [scores[n][0] for n in names]
        err = [[scores[n][0] - scores[n][1] for n in names], [scores[n][2] - scores[n][0] for n in names]]
        bx.barh(range(len(names)), vals, xerr=err, color="tab:blue", alpha=0.8, capsize=3)
        bx.set_yticks(range(len(names)), [labels.get(n, n) for n in names])
        bx.axvline(50.0, color="grey", linewidth=0.8)
        for i, n in enumerate(names):  # the value right of its error bar
            bx.text(scores[n][2] + 1.0, i, f"{scores[n][0]:.1f}", va="center", fontsize=8)
    bx.set_xlabel("win rate vs Ref (%), with CI")
    bx.set_title("Final: Table 1 win rate against Ref")
    bx.set_xlim(0, 100)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    return {"curves": curves, "win_rate_vs_ref": scores}


def plot_overoptimization(rows: list[dict], out_png) -> dict:
    """The overoptimization study (eval.overoptimization rows): top, per loss (RSO runs apart), the gold win rate against
    the reference vs √KL(π‖π_ref), one line per run (β and the method's knob), points in step order with
    the interval of each; bottom, the proxy (held-out implicit-reward accuracy) vs the same gold win rate.
    Pooled rows are drawn where a run has several seeds, else its one seed's rows.

    Returns {run: {"sqrt_kl": [...], "gold": [...], "proxy": [...], "steps": [...]}} as drawn."""
    pooled = {r["method"] for r in rows if r["seed"] == "pooled"}
    keep = [r for r in rows if (r["seed"] == "pooled") == (r["method"] in pooled)]
    series: dict[str, dict] = {}
    for r in keep:
        panel = r["loss"] + (", RSO pairs" if r.get("pairs") == "rso" else "")
        s = series.setdefault(r["method"], {"loss": panel, "beta": r["beta"], "knob": r["knob"],
                                            "knob_value": r["knob_value"], "points": {}})
        s["points"].setdefault(r["step"], {"snapshot_kl": r["kl"]})[r["metric"]] = (r["value"], r["ci_low"], r["ci_high"])
    losses = sorted({s["loss"] for s in series.values()})
    fig = Figure(figsize=(4.2 * max(1, len(losses)), 7.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, max(1, len(losses)), squeeze=False)
    data = {}
    for col, loss in enumerate(losses):
        top, bottom = axes[0][col], axes[1][col]
        for name in sorted(n for n, s in series.items() if s["loss"] == loss):
            s = series[name]
            steps = sorted(s["points"])
            pts = [s["points"][k] for k in steps]
            x = [float(np.sqrt(max(p["snapshot_kl"], 0.0))) for p in pts]
            gold = [p["gold_win_rate"] for p in pts]
            proxy = [p["proxy_accuracy"] for p in pts]
            label = f"β={s['beta']}" + (f", {s['knob']}={s['knob_value']}" if s["knob"] else "")
            y = [g[0] for g in gold]
            err = [[g[0] - g[1] for g in gold], [g[2] - g[0] for g in gold]]
            top.errorbar(x, y, yerr=err, marker="o", capsize=2, label=label)
            bottom.plot([p[0] for p in proxy], y, marker="o", label=label)
            data[name] = {"steps": steps, "sqrt_kl": x, "gold": y, "proxy": [p[0] for p in proxy]}
        top.axhline(50.0, color="grey", lw=0.8, ls=":")
        top.set_title(loss)
        top.set_xlabel("√KL(π‖π_ref)  (nats^½, sampled)")
        top.set_ylabel("gold win rate vs Ref (%)")
        top.legend(fontsize=7)
        bottom.axhline(50.0, color="grey", lw=0.8, ls=":")
        bottom.set_xlabel("proxy: held-out implicit-reward accuracy (%)")
        bottom.set_ylabel("gold win rate vs Ref (%)")
    fig.suptitle("Overoptimization: gold quality vs distance from the reference (points in step order)")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    return data
