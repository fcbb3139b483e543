"""RSO's statistical rejection sampling (Liu et al., ICLR 2024, Appendix A.1 Algorithm 1): its limits in beta,
and with m = 1 on a small discrete proposal, acceptance frequencies that match the target pi·exp(r/beta)
(a seeded chi-square test).

Run: pytest tests/test_rso.py -q      (a few seconds)
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import chisquare

from rpo import rso


def test_beta_to_infinity_accepts_the_first_m():
    rng = np.random.default_rng(0)
    rewards = [0.3, -2.0, 5.0, 1.0, 0.0, 4.0]
    for beta in (math.inf, 1e12):
        assert rso.rejection_sample(rewards, 3, beta, rng) == [0, 1, 2]


def test_beta_to_zero_accepts_the_top_m():
    rng = np.random.default_rng(0)
    rewards = [0.3, -2.0, 5.0, 1.0, 0.0, 4.0]
    for _ in range(20):
        assert rso.rejection_sample(rewards, 3, 1e-9, rng) == [2, 5, 3]  # best first: r_max each round


def test_accepts_m_distinct_candidates():
    rng = np.random.default_rng(1)
    for _ in range(50):
        got = rso.rejection_sample(rng.normal(size=10), 4, 0.5, rng)
        assert len(got) == 4 == len(set(got))


def test_m_equal_one_samples_the_target_distribution():
    """The proposal pi over 4 outcomes with rewards r; each trial draws N = 64 candidates from pi and keeps the
    one Algorithm 1 accepts. Target: pi(y) exp(r(y)/beta), normalised. With N = 64 the best outcome is among
    the candidates in all but 0.9^64 = 0.1% of trials, when r_max is the global maximum and the algorithm is
    exact rejection sampling (Theorem 1), so the frequencies must pass a chi-square test."""
    pi = np.array([0.4, 0.3, 0.2, 0.1])
    r = np.array([0.0, 0.5, 1.0, 1.5])
    beta = 1.0
    target = pi * np.exp(r / beta)
    target /= target.sum()
    rng = np.random.default_rng(2024)
    trials = 20000
    counts = np.zeros(4)
    for _ in range(trials):
        cand = rng.choice(4, size=64, p=pi)
        (k,) = rso.rejection_sample(r[cand], 1, beta, rng)
        counts[cand[k]] += 1
    stat, p = chisquare(counts, trials * target)
    assert p > 0.01, (counts / trials, target, p)
    # and the test has power: the proposal itself (beta -> infinity) is rejected
    assert chisquare(counts, trials * pi).pvalue < 1e-6


def test_bad_arguments_are_named():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="m_accepted must be in 1..2"):
        rso.rejection_sample([0.0, 1.0], 3, 0.5, rng)
    with pytest.raises(ValueError, match="beta must be > 0"):
        rso.rejection_sample([0.0, 1.0], 1, 0.0, rng)


def test_distinct_and_first_round_pairs():
    assert rso.distinct(["a", "b", "a", "c", "b"]) == [0, 1, 3]
    assert rso.first_round_pairs([4, 1, 7, 2, 9]) == [(4, 1), (7, 2)]
