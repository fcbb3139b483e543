"""Best-of-n sampling measured by a gold reward (Gao et al. 2023; Coste et al., ICLR 2024, Sec. 4.1):
how far best-of-n drifts from the reference, KL_bon(n), against the gold and proxy scores of the response
it picks, for a single proxy reward model and for the ensemble objectives of rpo.reward.

The unbiased estimator (Coste et al.'s `src/bon/bon_sampling.py`, as Gao et al. use it): of N samples
of one prompt, sorted ascending by the proxy score the objective gives them, a random subset of n has its
best at sorted position i (1-based) with probability C(i-1, n-1) / C(N, n), so

    E[score of best-of-n] = sum_{i=n}^{N} C(i-1, n-1) / C(N, n) * score_(i)

for the proxy score and for the gold score, the gold scores permuted by the SAME sort (the released
`ensemble_rm.get_ensemble_score` leaves that line commented out, so its ensemble gold curves use member
1's order; not here). Ties of the proxy score are broken at random: the gold scores of tied samples are
replaced by their mean, which is the expectation over that tie-break (the n = 1 value is unchanged).
Averaged over prompts, with a percentile bootstrap over prompts (eval.bootstrap).

    KL_bon(n) = log n - (n - 1) / n      (nats; the formula of Stiennon et al. 2020 that Gao et al. and
                                          Coste et al. plot against. It needs the N samples drawn from the
                                          reference itself: temperature 1, no top-k / top-p. Beirami et al.
                                          2024 show it is an upper bound of the true KL, reached when no two
                                          responses tie in reward)
"""
from __future__ import annotations

import csv
import math

import numpy as np
from scipy.special import comb

from eval.bootstrap import bootstrap_mean
from rpo import io


def kl_bon(n: int) -> float:
    """KL(best-of-n || reference) in nats: log n - (n - 1) / n."""
    if n < 1:
        raise ValueError(f"kl_bon: n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def bon_coefficients(n: int, big_n: int) -> np.ndarray:
    """Weight of each ascending sorted position 1..N in E[best of n of N]: C(i-1, n-1) / C(N, n) for
    i >= n, 0 below (exact integers, then one division)."""
    if not 1 <= n <= big_n:
        raise ValueError(f"best-of-n: need 1 <= n <= N, got n={n}, N={big_n}")
    total = comb(big_n, n, exact=True)
    return np.array([comb(i - 1, n - 1, exact=True) / total if i >= n else 0.0 for i in range(1, big_n + 1)])


def tie_mean(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """`values` with each group of equal `keys` replaced by the group's mean (random tie-breaking)."""
    out = np.asarray(values, dtype=np.float64).copy()
    _, inverse = np.unique(keys, return_inverse=True)
    sums = np.bincount(inverse, weights=out)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]


def best_of_n(proxy, gold, ns) -> dict[int, tuple[float, float]]:
    """One prompt's N samples: {n: (E[proxy of best-of-n], E[gold of best-of-n])} for each n in `ns`,
    the best chosen by `proxy` (module docstring)."""
    proxy = np.asarray(proxy, dtype=np.float64)
    gold = np.asarray(gold, dtype=np.float64)
    if proxy.shape != gold.shape or proxy.ndim != 1 or proxy.size == 0:
        raise ValueError(f"best_of_n: expected equal 1-d proxy and gold scores, got {proxy.shape} and {gold.shape}")
    order = np.argsort(proxy, kind="stable")
    p, g = proxy[order], tie_mean(proxy[order], gold[order])
    out = {}
    for n in ns:
        c = bon_coefficients(n, proxy.size)
        out[n] = (float(c @ p), float(c @ g))
    return out


def default_ns(big_n: int) -> list[int]:
    """1, 2, 4, ... up to N, and N itself (Coste et al.'s grid is powers of 2 and its N)."""
    ns = [2 ** j for j in range(big_n.bit_length()) if 2 ** j <= big_n]
    return ns + ([big_n] if ns[-1] != big_n else [])


# ---------------------------------------------------------------------------------------------------
# Every objective's curve on one prompt, and the tidy rows over prompts
# ---------------------------------------------------------------------------------------------------

COLUMNS = ("objective", "member", "n", "kl_bon", "metric", "value", "ci_low", "ci_high", "n_prompts", "seed")
# proxy: the objective's own score of the pick; gold: the gold score of the pick; gold_gain: gold minus the same
# prompt's n = 1 gold (the mean gold of its samples), paired per prompt, so the prompts' own levels cancel from
# its interval
METRICS = ("proxy", "gold", "gold_gain")
SINGLE, POOLED, ENSEMBLE = "single", "members", "ensemble"
OBJECTIVE_LABELS = {SINGLE: "single RM (mean of members)", "mean": "mean", "wco": "WCO (min)", "uwo": "UWO"}


def prompt_curves(member_scores, gold, ns, *, lam: float) -> dict[tuple[str, str], dict[int, tuple[float, float]]]:
    """One prompt: {(objective, member): {n: (proxy, gold)}} for each single member (member = its index as
    a string) and each ensemble objective of rpo.reward (member = ENSEMBLE), from `member_scores`
    ([k members, N samples]) and the samples' `gold` scores ([N])."""
    from rpo.reward import OBJECTIVES, ensemble_objective  # rpo.reward imports torch
    scores = np.asarray(member_scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] != len(gold):
        raise ValueError(f"best-of-n: member scores {scores.shape} do not fit {len(gold)} gold scores")
    out = {(SINGLE, str(i)): best_of_n(s, gold, ns) for i, s in enumerate(scores)}
    for objective in OBJECTIVES:
        out[(objective, ENSEMBLE)] = best_of_n(ensemble_objective(scores, objective, lam=lam), gold, ns)
    return out


def bon_rows(prompts: list[dict], members: list[str], ns, *, lam: float, n_boot: int, boot_seed: int, ci: float,
             seed: int) -> list[dict]:
    """The CSV rows (COLUMNS): `prompts` = [{"id", "scores": [k, N], "gold": [N]}], `members` names the k
    members (in the order of "scores"). Per (objective, member, n, metric): the mean over prompts and its
    percentile bootstrap interval over prompts; the single members also pooled (member POOLED: per prompt
    the mean of the members' values, Coste et al.'s single-RM line); metrics METRICS. `seed`: the samples' seed."""
    if not prompts:
        raise ValueError("best-of-n: no prompts")
    # n = 1 is every gain's baseline, computed whether or not it is listed
    per = [prompt_curves(p["scores"], p["gold"], sorted(set(ns) | {1}), lam=lam) for p in prompts]
    keys = [(SINGLE, str(i)) for i in range(len(members))] + [(SINGLE, POOLED)] + \
        [(o, ENSEMBLE) for o in ("mean", "wco", "uwo")]
    rows = []
    for objective, member in keys:
        for n in ns:
            for metric in METRICS:
                j = 0 if metric == "proxy" else 1

                def value(c, key, n=n, j=j, metric=metric):  # one prompt's value of one curve
                    return c[key][n][j] - (c[key][1][j] if metric == "gold_gain" else 0.0)
                if member == POOLED:
                    vals = [np.mean([value(c, (SINGLE, str(i))) for i in range(len(members))]) for c in per]
                else:
                    vals = [value(c, (objective, member)) for c in per]
                value, lo, hi = bootstrap_mean(vals, n_boot=n_boot, seed=boot_seed, ci=ci)
                name = members[int(member)] if member.isdigit() else member
                rows.append({"objective": objective, "member": name, "n": n, "kl_bon": kl_bon(n), "metric": metric,
                             "value": value, "ci_low": lo, "ci_high": hi, "n_prompts": len(vals), "seed": seed})
    return rows


def write_rows(rows: list[dict], path) -> None:
    with io.atomic_open(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in COLUMNS})


def plot_bon(rows: list[dict], out_png) -> dict[str, list[tuple[float, float]]]:
    """Coste et al.'s best-of-n figure: gold (left), its gain over n = 1 (middle) and proxy (right) score
    against KL_bon, one line per objective (the single members pooled, mean, WCO, UWO) with its bootstrap
    band; returns the plotted {objective/metric: [(kl, value)]}."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    drawn = {}
    for ax, metric, ylabel in ((axes[0], "gold", "gold score (IFEval verifiers)"),
                               (axes[1], "gold_gain", "gold gain over n = 1 (paired per prompt)"),
                               (axes[2], "proxy", "proxy score (the objective's own)")):
        for objective, label in OBJECTIVE_LABELS.items():
            member = POOLED if objective == SINGLE else ENSEMBLE
            pts = sorted((r["kl_bon"], r["value"], r["ci_low"], r["ci_high"]) for r in rows
                         if r["objective"] == objective and r["member"] == member and r["metric"] == metric)
            if not pts:
                raise ValueError(f"best-of-n figure: no {metric} rows for {objective}")
            kl, v, lo, hi = (np.array(x) for x in zip(*pts))
            line, = ax.plot(kl, v, marker="o", ms=3, label=label)
            ax.fill_between(kl, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
            drawn[f"{objective}/{metric}"] = list(zip(kl.tolist(), v.tolist()))
        ax.set_xlabel("KL_bon = log n - (n-1)/n (nats)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    n_prompts = rows[0]["n_prompts"]
    fig.suptitle(f"Best-of-n from the reference, {n_prompts} held-out prompts (95% bootstrap bands over prompts)",
                 fontsize=10)
    fig.tight_layout()
    with io.atomic_open(out_png, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    return drawn


def make_bon(*, gold_path, score_paths: list[str], members: list[str], ns: list[int] | None, lam: float,
             csv_path, figure, n: int, seed: int, ci: float, samples_seed: int) -> list[dict]:
    """results/bon.csv and its figure from the gold scores of the samples (rpo.candidates.gold_candidates) and
    each member's scores (score_paths[i] is members[i]'s); `ns` null = default_ns(N). `n`, `seed`, `ci`: the
    bootstrap's; `samples_seed`: the seed the samples were drawn with (the CSV's seed column)."""
    if len(score_paths) != len(members) or not members:
        raise ValueError(f"best-of-n: {len(score_paths)} score files for members {members}")
    gold = io.read_jsonl(gold_path)
    scores = [{r["id"]: r["scores"] for r in io.read_jsonl(p)} for p in score_paths]
    prompts = []
    for g in gold:
        missing = [p for p, s in zip(score_paths, scores) if g["id"] not in s]
        if missing:
            raise ValueError(f"best-of-n: prompt {g['id']!r} of {gold_path} has no scores in {missing}")
        m = [s[g["id"]] for s in scores]
        if any(len(x) != len(g["gold"]) for x in m):
            raise ValueError(f"best-of-n: prompt {g['id']!r}: {[len(x) for x in m]} member scores for "
                             f"{len(g['gold'])} samples")
        prompts.append({"id": g["id"], "scores": m, "gold": g["gold"]})
    big_n = len(prompts[0]["gold"]) if prompts else 0
    ns = sorted(set(ns)) if ns else default_ns(big_n)
    if ns[-1] > big_n:
        raise ValueError(f"best_of_n.ns: {ns[-1]} exceeds the {big_n} samples per prompt (best_of_n.n_samples)")
    rows = bon_rows(prompts, members, ns, lam=lam, n_boot=n, boot_seed=seed, ci=ci, seed=samples_seed)
    write_rows(rows, csv_path)
    plot_bon(rows, figure)
    return rows
