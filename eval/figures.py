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

REQUIRED_KEYS = ("step", "logps/chosen")


def read_metrics(path) -> list[dict]:
    """Records of a metrics JSONL file; blank lines are skipped.

    Every record must be a JSON object with ``step`` and ``logps/chosen``.
    """
    from rpo.io import read_json_objects
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
