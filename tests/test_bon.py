"""Best-of-n measured by the gold reward (issue 26): the unbiased estimator against enumeration of every
subset, KL_bon, the ensemble objectives' curves, and the gold scores following the ensemble's own order
(the bug of Coste et al.'s released ensemble code, which this must not repeat).

Run: pytest tests/test_bon.py -q      (a few seconds)
"""
from __future__ import annotations

import csv
import itertools
import math

import numpy as np
import pytest

from eval import bon
from rpo.reward import ensemble_objective


def brute_force(proxy, gold, n):
    """E[proxy, gold of the best of a uniformly random n-subset], ties of the proxy broken uniformly at random:
    every subset enumerated, and within a subset every sample tied at its maximum proxy equally likely."""
    ps, gs = [], []
    for subset in itertools.combinations(range(len(proxy)), n):
        top = max(proxy[i] for i in subset)
        tied = [i for i in subset if proxy[i] == top]
        ps.append(top)
        gs.append(sum(gold[i] for i in tied) / len(tied))
    return sum(ps) / len(ps), sum(gs) / len(gs)


def test_issue_check_values():
    # scores [0, 1, 2, 3], N = 4, n = 2: the maxima of the 6 pairs are 1, 2, 2, 3, 3, 3 -> 14/6
    out = bon.best_of_n([0, 1, 2, 3], [0, 1, 2, 3], [1, 2, 4])
    assert out[2] == pytest.approx((14 / 6, 14 / 6), abs=1e-12)
    assert out[1] == pytest.approx((1.5, 1.5))  # n = 1: the mean
    assert out[4] == pytest.approx((3.0, 3.0))  # n = N: the maximum
    assert bon.kl_bon(1) == 0.0
    assert round(bon.kl_bon(12500), 4) == 8.4336  # log 12500 - 12499/12500


@pytest.mark.parametrize("big_n", [1, 2, 5, 9, 16])
def test_coefficients_sum_to_one(big_n):
    for n in range(1, big_n + 1):
        c = bon.bon_coefficients(n, big_n)
        assert c.sum() == pytest.approx(1.0, abs=1e-12)
        assert (c[:n - 1] == 0).all() and (c[n - 1:] > 0).all()


@pytest.mark.parametrize("seed", range(6))
def test_estimator_equals_enumeration_of_every_subset(seed):
    rng = np.random.default_rng(seed)
    big_n = int(rng.integers(3, 9))
    # integer proxy scores make ties likely: the random tie-break must match too
    proxy = rng.integers(0, 4, size=big_n).astype(float) if seed % 2 else rng.normal(size=big_n)
    gold = rng.uniform(size=big_n)
    est = bon.best_of_n(proxy, gold, range(1, big_n + 1))
    for n in range(1, big_n + 1):
        assert est[n] == pytest.approx(brute_force(proxy, gold, n), abs=1e-12), n


def test_gold_is_sorted_by_the_proxy_not_left_in_sample_order():
    # the best of all 3 by the proxy is sample 0, whose gold is 0.0 (not the last sample's 1.0)
    assert bon.best_of_n([5.0, 1.0, 2.0], [0.0, 0.5, 1.0], [3])[3] == (5.0, 0.0)


def test_all_tied_proxy_gives_the_mean_gold_for_every_n():
    out = bon.best_of_n([1.0] * 4, [0.0, 0.2, 0.4, 1.0], [1, 2, 3, 4])
    assert all(v == pytest.approx((1.0, 0.4)) for v in out.values())


def test_uwo_is_mean_minus_lambda_population_variance():
    s = np.array([[1.0], [2.0], [3.0]])  # 3 members, one response
    assert ensemble_objective(s, "uwo", lam=0.5)[0] == pytest.approx(2 - 0.5 * 2 / 3)  # 1.6667, not 1.5
    assert round(float(ensemble_objective(s, "uwo", lam=0.5)[0]), 4) == 1.6667
    assert ensemble_objective(s, "wco")[0] == 1.0 and ensemble_objective(s, "mean")[0] == 2.0
    with pytest.raises(ValueError, match="expected one of"):
        ensemble_objective(s, "max")


def test_identical_members_give_the_single_members_curve():
    rng = np.random.default_rng(0)
    one, gold = rng.normal(size=8), rng.uniform(size=8)
    curves = bon.prompt_curves(np.stack([one] * 4), gold, [1, 2, 4, 8], lam=0.5)
    single = bon.best_of_n(one, gold, [1, 2, 4, 8])
    assert len(curves) == 4 + 3
    for key, curve in curves.items():  # variance 0: UWO = mean = min = the member
        for n in single:
            assert curve[n] == pytest.approx(single[n], abs=1e-12), (key, n)


def test_ensemble_gold_follows_the_ensembles_order():
    """Member 0 ranks the samples one way, the ensemble (by every objective) another. Coste et al.'s released
    get_ensemble_score keeps member 0's gold order; that number must not come out here."""
    members = np.array([[3.0, 2.0, 1.0, 0.0],   # member 0: sample 0 best
                        [0.0, 1.0, 2.0, 9.0],   # members 1, 2: sample 3 best by far
                        [0.0, 1.0, 2.0, 9.0]])
    gold = np.array([1.0, 0.0, 0.0, 0.25])
    curves = bon.prompt_curves(members, gold, [1, 2, 4], lam=0.5)
    for objective in ("mean", "wco", "uwo"):
        ens = ensemble_objective(members, objective, lam=0.5)
        for n in (2, 4):
            want = brute_force(list(ens), list(gold), n)
            assert curves[(objective, bon.ENSEMBLE)][n] == pytest.approx(want), (objective, n)
            # the released code: proxy sorted by the ensemble, gold left in member 0's ascending order
            buggy_gold = bon.bon_coefficients(n, 4) @ gold[np.argsort(members[0], kind="stable")]
            assert abs(curves[(objective, bon.ENSEMBLE)][n][1] - buggy_gold) > 0.1, (objective, n)


def test_rows_pool_members_and_bootstrap_over_prompts(tmp_path):
    rng = np.random.default_rng(1)
    prompts = [{"id": f"p{i}", "scores": rng.normal(size=(3, 8)).tolist(), "gold": rng.uniform(size=8).tolist()}
               for i in range(5)]
    ns = bon.default_ns(8)
    assert ns == [1, 2, 4, 8] and bon.default_ns(12) == [1, 2, 4, 8, 12]
    rows = bon.bon_rows(prompts, ["rm-seed1", "rm-seed2", "rm-seed3"], ns, lam=0.5, n_boot=200, boot_seed=0,
                        ci=0.95, seed=7)
    # 3 members + pooled + 3 ensembles, 4 ns, 3 metrics
    assert len(rows) == 7 * 4 * 3
    by = {(r["objective"], r["member"], r["n"], r["metric"]): r for r in rows}
    per_prompt = [[bon.best_of_n(p["scores"][i], p["gold"], [4])[4][1] for i in range(3)] for p in prompts]
    assert by[("single", "members", 4, "gold")]["value"] == pytest.approx(np.mean(per_prompt))
    assert by[("single", "rm-seed2", 4, "gold")]["value"] == pytest.approx(np.mean([v[1] for v in per_prompt]))
    # the gain is paired per prompt: gold(4) - gold(1) of each prompt, averaged
    gain = [bon.best_of_n(p["scores"][1], p["gold"], [4])[4][1] - np.mean(p["gold"]) for p in prompts]
    assert by[("single", "rm-seed2", 4, "gold_gain")]["value"] == pytest.approx(np.mean(gain))
    assert by[("wco", "ensemble", 1, "gold_gain")]["value"] == 0 == by[("wco", "ensemble", 1, "gold_gain")]["ci_high"]
    for r in rows:
        assert r["ci_low"] <= r["value"] <= r["ci_high"] and r["n_prompts"] == 5 and r["seed"] == 7
        assert r["kl_bon"] == pytest.approx(math.log(r["n"]) - (r["n"] - 1) / r["n"])
    bon.write_rows(rows, tmp_path / "bon.csv")
    back = list(csv.DictReader((tmp_path / "bon.csv").open()))
    assert tuple(back[0]) == bon.COLUMNS and len(back) == len(rows)
    drawn = bon.plot_bon(rows, tmp_path / "bon.png")
    assert (tmp_path / "bon.png").read_bytes()[:4] == b"\x89PNG"
    assert set(drawn) == {f"{o}/{m}" for o in ("single", "mean", "wco", "uwo") for m in ("gold", "gold_gain", "proxy")}
    # without n = 1 among the ns, the gain still has its baseline
    rows2 = bon.bon_rows(prompts, ["a", "b", "c"], [2, 8], lam=0.5, n_boot=50, boot_seed=0, ci=0.95, seed=0)
    assert {r["n"] for r in rows2} == {2, 8}
