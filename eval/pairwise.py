"""Pairwise win rates with a seeded bootstrap confidence interval.

A judge scores two models' responses to the same prompt; each prompt yields
one outcome for model A: 1 (A better), 0 (B better) or 0.5 (tie). Ties count
half, as in the paper's Table 1, which makes the rate of A over B equal to
100 minus the rate of B over A.

The interval is a percentile bootstrap over prompts. The generator is seeded
so a rerun of the pipeline reproduces the table byte for byte.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np

# A single verdict gives 0, 0.5 or 1; an LLM judge asked in both orders (eval.pairwise_judge.judge_both_orders)
# averages two verdicts, which adds 0.25 and 0.75 (the two orders disagree by half a point).
_ALLOWED = (0.0, 0.25, 0.5, 0.75, 1.0)


def outcome(score_a: float, score_b: float) -> float:
    """Outcome for A of one prompt: 1.0 win, 0.0 loss, 0.5 tie."""
    if score_a > score_b:
        return 1.0
    if score_a < score_b:
        return 0.0
    return 0.5


def _check_outcomes(outcomes: Sequence[float]) -> np.ndarray:
    arr = np.asarray(list(outcomes), dtype=float)
    if arr.size == 0:
        raise ValueError("win_rate: no outcomes (empty list)")
    for i, x in enumerate(arr):
        # NaN fails every comparison, so it is caught here too.
        if x not in _ALLOWED:
            raise ValueError(
                f"win_rate: outcome at index {i} is {x!r}; expected 0, 0.25, 0.5, 0.75 or 1"
            )
    return arr


def win_rate(
    outcomes: Sequence[float],
    *,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict:
    """Mean outcome in percent with a seeded percentile bootstrap CI.

    Returns {"value", "ci_low", "ci_high", "n"}; value and bounds in 0..100.
    """
    arr = _check_outcomes(outcomes)
    if n_boot < 1:
        raise ValueError(f"win_rate: n_boot must be >= 1, got {n_boot}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"win_rate: ci must be in (0, 1), got {ci}")
    n = int(arr.size)
    rng = np.random.default_rng(seed)
    # Resample prompt indices; one row per bootstrap replicate.
    idx = rng.integers(0, n, size=(n_boot, n))
    boot = arr[idx].mean(axis=1) * 100.0
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return {
        "value": float(arr.mean() * 100.0),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "n": n,
    }


def pairwise_from_scores(
    scores_a: Mapping[Hashable, float],
    scores_b: Mapping[Hashable, float],
    **boot,
) -> dict:
    """Win rate of A over B from per-prompt judge scores keyed by prompt id.

    Both sides must cover the same ids: a prompt missing on one side would
    otherwise be dropped silently and bias the rate.
    """
    only_a = sorted(set(scores_a) - set(scores_b), key=str)
    only_b = sorted(set(scores_b) - set(scores_a), key=str)
    if only_a or only_b:
        raise ValueError(
            "pairwise_from_scores: prompt ids differ "
            f"({len(scores_a)} scored for A, {len(scores_b)} for B); "
            f"{len(only_b)} missing from A, e.g. {only_b[:5]}; "
            f"{len(only_a)} missing from B, e.g. {only_a[:5]}"
        )
    # Sorted ids give a fixed outcome order, so the seeded bootstrap does not
    # depend on dict insertion order.
    ids = sorted(scores_a, key=str)
    outs = [outcome(float(scores_a[i]), float(scores_b[i])) for i in ids]
    return win_rate(outs, **boot)
