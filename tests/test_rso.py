"""RSO's statistical rejection sampling (Liu et al., ICLR 2024, Appendix A.1 Algorithm 1): its limits in beta,
and with m = 1 on a small discrete proposal, acceptance frequencies that match the target pi·exp(r/beta)
(a seeded chi-square test).

Run: pytest tests/test_rso.py -q      (a few seconds)
"""
from __future__ import annotations

import json
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


# ---------------------------------------------------------------------------------------------------
# RSO's pairs from scored candidates
# ---------------------------------------------------------------------------------------------------

def _write(rows, path):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def rso_files(tmp_path):
    from helpers.data import tiny_pairs
    pairs = tiny_pairs(2)
    texts = [["a0", "b0", "a0", "", "c0", "d0"], ["a1", "b1", "c1", "d1", "e1", "f1"]]
    samples = [{"id": p["id"], "messages": p["prompt"], "responses": t, "n_tokens": [1] * 6, "finished": [True] * 6}
               for p, t in zip(pairs, texts)]
    gold = [{"id": "p0", "gold": [0.1, 0.9, 0.1, 0.0, 0.5, 0.7]}, {"id": "p1", "gold": [0.0, 1.0, 0.5, 0.5, 0.2, 0.3]}]
    scores = [[{"id": "p0", "scores": [1.0, 2.0, 1.0, 9.0, 3.0, 0.0]}, {"id": "p1", "scores": [0, 1, 2, 3, 4, 5]}],
              [{"id": "p0", "scores": [1.0, 4.0, 1.0, 9.0, 1.0, 0.0]}, {"id": "p1", "scores": [0, 1, 2, 3, 4, 5]}]]
    return {"samples_path": _write(samples, tmp_path / "samples.jsonl"),
            "pairs_path": _write(pairs, tmp_path / "train.jsonl"),
            "gold_path": _write(gold, tmp_path / "gold.jsonl"),
            "score_paths": [_write(s, tmp_path / f"s{i}.jsonl") for i, s in enumerate(scores)],
            "out": tmp_path / "rso.jsonl", "summary_path": tmp_path / "summary.json"}


def _pairs(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rso_pairs_by_gold_at_small_beta_are_the_top_m_paired_in_order(rso_files):
    s = rso.make_rso_pairs(**rso_files, reward="gold", labeller="gold", m_accepted=4, beta=1e-9, seed=0)
    # p0: "a0" twice is one candidate and "" none, so 4 remain (a0 b0 c0 d0): all accepted, best first
    # (b0 .9, d0 .7, c0 .5, a0 .1) -> pairs (b0, d0), (c0, a0); p1: the top 4 are b1 1.0, c1 .5, d1 .5 (tied:
    # one round accepts both, in candidate order), f1 .3 -> (b1, c1), (d1, f1)
    got = [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in _pairs(rso_files["out"])]
    assert got == [("b0", "d0"), ("c0", "a0"), ("b1", "c1"), ("d1", "f1")]
    assert s["pairs"] == 4 and s["distinct_nonempty"] == 10 and s["candidates"] == 12 and s["accepted"] == 8
    assert s["mean_gold_accepted"] > s["mean_gold_candidates"]
    row = _pairs(rso_files["out"])[0]
    assert row["id"] == "p0-rso0" and row["meta"]["instruction_id_list"] == ["change_case:english_lowercase"]
    assert row["meta"]["rso"]["chosen_gold"] == 0.9 and row["prompt"] == [
        {"role": "user", "content": "write a short answer in lowercase letters only 0"}]


def test_rso_pairs_by_an_ensemble_reward_ranked_by_the_reward(rso_files):
    s = rso.make_rso_pairs(**rso_files, reward="wco", labeller="reward", m_accepted=2, beta=1e-9, seed=0)
    # p0, wco = min over members of [a0 1, b0 2, c0 1, d0 0] -> b0 then a0 (c0 ties a0 at 1: a0 comes first)
    # p1: f1 5, e1 4
    got = [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in _pairs(rso_files["out"])]
    assert got == [("b0", "a0"), ("f1", "e1")] and s["ties_dropped"] == 0


def test_gold_scores_beside_a_proxy_labeller_change_no_pair_and_count_its_agreement(rso_files):
    kw = {"reward": "mean", "labeller": "reward", "m_accepted": 4, "beta": 1e-9, "seed": 0}
    without = rso.make_rso_pairs(**{**rso_files, "gold_path": None}, **kw)
    plain = [(p["chosen"], p["rejected"]) for p in _pairs(rso_files["out"])]
    s = rso.make_rso_pairs(**rso_files, **kw)
    assert [(p["chosen"], p["rejected"]) for p in _pairs(rso_files["out"])] == plain
    assert "pairs_by_gold" not in without
    # mean of the members: p0 [a0 1, b0 3, c0 2, d0 0] -> (b0, c0) gold .9 > .5, (a0, d0) .1 < .7;
    # p1 [.., c1 2, d1 3, e1 4, f1 5] -> (f1, e1) .3 > .2, (d1, c1) .5 = .5
    assert s["pairs_by_gold"] == {"agree": 2, "tie": 1, "disagree": 1}


def test_rso_pairs_drop_ties_of_the_labeller(rso_files):
    s = rso.make_rso_pairs(**rso_files, reward="mean", labeller="gold", m_accepted=6, beta=math.inf, seed=0)
    # beta = inf: the candidates in order; p1's (c1, d1) tie at gold .5
    assert s["ties_dropped"] == 1 and s["prompts_with_fewer_than_m"] == 1  # p0 has only 4 distinct, non-empty
    got = [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in _pairs(rso_files["out"])]
    assert got == [("b0", "a0"), ("d0", "c0"), ("b1", "a1"), ("f1", "e1")]


def test_rso_pairs_need_what_their_reward_and_labeller_read(rso_files):
    with pytest.raises(ValueError, match="needs gold_path"):
        rso.make_rso_pairs(**{**rso_files, "gold_path": None}, reward="mean", labeller="gold", m_accepted=2,
                           beta=0.5, seed=0)
    with pytest.raises(ValueError, match="needs the reward models' scores"):
        rso.make_rso_pairs(**{**rso_files, "score_paths": None}, reward="uwo", labeller="gold", m_accepted=2,
                           beta=0.5, seed=0)
