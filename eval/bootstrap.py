"""Seeded percentile bootstrap intervals of a mean: over items, and over seeds and items together.

hierarchical_bootstrap is the interval of a quantity measured on several training seeds, each on the same
kind of items (prompts): a replicate draws the seeds with replacement and, within each drawn seed, its
items with replacement, so seed-to-seed variation is in the interval as well as the sampling of prompts
(eval.overoptimization's pooled rows, Table 1's pooled win rates).
"""
from __future__ import annotations

import numpy as np


def percentile_ci(boot: np.ndarray, ci: float) -> tuple[float, float]:
    alpha = (1.0 - ci) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_mean(values, *, n_boot: int, seed: int, ci: float) -> tuple[float, float, float]:
    """Mean and percentile bootstrap interval over items."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        raise ValueError("bootstrap_mean: no values")
    rng = np.random.default_rng(seed)
    boot = arr[rng.integers(0, arr.size, size=(n_boot, arr.size))].mean(axis=1)
    return (float(arr.mean()), *percentile_ci(boot, ci))


def hierarchical_bootstrap(groups: list, *, n_boot: int, seed: int, ci: float) -> tuple[float, float, float]:
    """Mean of the groups' means (each group: one seed's item values) with a two-level percentile bootstrap:
    per replicate, len(groups) groups drawn with replacement, then within each drawn group as many items as
    it has, drawn with replacement; the replicate's statistic is the mean of those groups' means."""
    arrs = [np.asarray(g, dtype=float) for g in groups]
    if not arrs or any(a.size == 0 for a in arrs):
        raise ValueError("hierarchical_bootstrap: every group needs at least one value")
    rng = np.random.default_rng(seed)
    s = len(arrs)
    boot = np.empty(n_boot)
    picks = rng.integers(0, s, size=(n_boot, s))
    for b in range(n_boot):
        means = [arrs[g][rng.integers(0, arrs[g].size, size=arrs[g].size)].mean() for g in picks[b]]
        boot[b] = np.mean(means)
    return (float(np.mean([a.mean() for a in arrs])), *percentile_ci(boot, ci))
