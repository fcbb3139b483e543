"""MT-Bench's score, as FastChat's show_result.py --mode single: drop score -1, the mean per turn and overall; plus a
seeded bootstrap interval and the rows of eval.results_table."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from eval.mtbench.data import _fail, _read_jsonl
from eval.results_table import make_row


def _judgment_rows(judgment_path, model: str | None) -> list[dict]:
    path = Path(judgment_path)
    rows = []
    for lineno, r in _read_jsonl(path):
        for k in ("question_id", "model", "score", "turn"):
            if k not in r:
                _fail(path, lineno, f"missing key {k!r}")
        if r["turn"] not in (1, 2):
            _fail(path, lineno, f"turn must be 1 or 2, got {r['turn']!r}")
        if isinstance(r["score"], bool) or not isinstance(r["score"], (int, float)):
            _fail(path, lineno, f"score must be a number, got {r['score']!r}")
        rows.append(r)
    models = sorted({r["model"] for r in rows})
    if model is None:
        if len(models) > 1:
            raise ValueError(f"{path}: judgments of several models {models}; name one with model=")
    else:
        rows = [r for r in rows if r["model"] == model]
        if not rows:
            raise ValueError(f"{path}: no judgments of model {model!r} (models: {models})")
    if not rows:
        raise ValueError(f"{path}: no judgments")
    return rows


def _mean(xs) -> float:
    return float(np.mean(xs)) if len(xs) else math.nan


def score(judgment_path, *, model: str | None = None) -> dict:
    """FastChat's show_result.py --mode single for one model: rows with score -1 are dropped, then the
    mean score of turn 1, of turn 2, and of all remaining rows (`average`, which weights each turn by its
    number of valid rows, as FastChat's groupby mean does).

    Returns {"first_turn", "second_turn", "average", "n" (valid rows), "n_invalid" (dropped rows),
    "n_first_turn", "n_second_turn"}. `model` picks one model of a file holding several.
    """
    rows = _judgment_rows(judgment_path, model)
    valid = [r for r in rows if r["score"] != -1]
    t1 = [float(r["score"]) for r in valid if r["turn"] == 1]
    t2 = [float(r["score"]) for r in valid if r["turn"] == 2]
    return {"first_turn": _mean(t1), "second_turn": _mean(t2), "average": _mean(t1 + t2),
            "n": len(valid), "n_invalid": len(rows) - len(valid), "n_first_turn": len(t1),
            "n_second_turn": len(t2)}


def ci(judgment_path, n_boot: int = 1000, seed: int = 0, *, turn: int | None = None, level: float = 0.95,
       model: str | None = None) -> tuple[float, float]:
    """Seeded percentile-bootstrap interval of the average score (or of one turn's, with turn=1 or 2).

    Questions are the resampled unit: a question's valid judgments (both turns) stay together, and each
    replicate takes the mean over all valid judgments of the drawn questions, as `score` does.
    """
    if n_boot < 1:
        raise ValueError(f"ci: n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"ci: level must be in (0, 1), got {level}")
    if turn not in (None, 1, 2):
        raise ValueError(f"ci: turn must be None, 1 or 2, got {turn!r}")
    rows = [r for r in _judgment_rows(judgment_path, model)
            if r["score"] != -1 and (turn is None or r["turn"] == turn)]
    if not rows:
        return (math.nan, math.nan)
    by_q: dict = {}
    for r in rows:
        by_q.setdefault(r["question_id"], []).append(float(r["score"]))
    qids = sorted(by_q, key=str)  # a fixed order, so the seeded draw does not depend on the file order
    sums = np.array([sum(by_q[q]) for q in qids])
    counts = np.array([len(by_q[q]) for q in qids])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(qids), size=(n_boot, len(qids)))
    boot = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


def table_rows(judgment_path, *, model_id: str, judge: str, n_boot: int = 1000, seed: int = 0,
               level: float = 0.95, model: str | None = None) -> list[dict]:
    """eval.results_table rows: mtbench (the average), mtbench_turn1, mtbench_turn2, each with its bootstrap CI;
    n = the valid judgments behind the number."""
    s = score(judgment_path, model=model)
    rows = _judgment_rows(judgment_path, model)
    out = []
    for metric, key, n, turn in (("mtbench", "average", s["n"], None),
                                 ("mtbench_turn1", "first_turn", s["n_first_turn"], 1),
                                 ("mtbench_turn2", "second_turn", s["n_second_turn"], 2)):
        lo, hi = ci(judgment_path, n_boot, seed, turn=turn, level=level, model=model)
        asked = sum(turn is None or r["turn"] == turn for r in rows)
        out.append(make_row(model_a=model_id, metric=metric, value=s[key], ci_low=lo, ci_high=hi, n=n,
                            judge=judge, note=f"{n}/{asked} ratings parsable" if math.isnan(s[key]) else None))
    return out
