"""Training-curve figures from per-step metrics JSONL files.

The headline figure is the paper's Fig. 1 (right): the summed log-probability
of the chosen response during training. Under DPO it drifts down (the
over-optimisation RPO targets); the SFT term in RPO should hold it up.

Figures are drawn on a bare ``Figure`` with the Agg canvas rather than via
pyplot, so importing this module never changes the process-wide backend and
no figure leaks into pyplot's global registry inside a long Snakemake run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

REQUIRED_KEYS = ("step", "logps/chosen")


def read_metrics(path) -> list[dict]:
    """Records of a metrics JSONL file; blank lines are skipped.

    Every record must be a JSON object with ``step`` and ``logps/chosen``.
    """
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object")
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


def plot_logps_chosen(
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
