"""Statistical rejection sampling (RSO: Liu et al., "Statistical Rejection Sampling Improves Preference
Optimization", ICLR 2024): responses from the estimated optimal policy pi_r(y|x) ∝ pi_sft(y|x) exp(r(x, y)/beta)
(their eq. 4), drawn out of N candidates of the SFT policy.

`rejection_sample` is their Appendix A.1 Algorithm 1: while fewer than m are accepted, r_max is the best reward
among the candidates not yet accepted, and each of those, in order, is accepted when u < exp((r - r_max)/beta),
u ~ U[0, 1), until m are. beta -> infinity accepts the first m candidates (pi_sft itself); beta -> 0 only
the best (top-m-of-N, the "rejection sampling" of Llama 2 and Anthropic's HH). Their algorithm keys the
candidates by text (a Python dict), so identical responses are one candidate: `distinct` does that here.
"""
from __future__ import annotations

import math


def rejection_sample(rewards, m: int, beta: float, rng) -> list[int]:
    """Indices of the accepted candidates (of `rewards`, in candidate order), in the order accepted.
    `rng`: a numpy Generator (one uniform draw per candidate visited, as their np.random.uniform)."""
    rewards = [float(r) for r in rewards]
    if not 1 <= m <= len(rewards):
        raise ValueError(f"rejection sampling: m_accepted must be in 1..{len(rewards)} (the candidates), got {m}")
    if not beta > 0:
        raise ValueError(f"rejection sampling: beta must be > 0, got {beta!r}")
    if any(math.isnan(r) for r in rewards):
        raise ValueError("rejection sampling: a reward is NaN")
    remaining = list(range(len(rewards)))
    accepted: list[int] = []
    while len(accepted) < m:
        r_max = max(rewards[i] for i in remaining)
        taken = []
        for i in remaining:
            # r <= r_max, so the exponent is <= 0 and exp never overflows; 1/inf gives exp(0) = 1
            if rng.uniform() >= math.exp((rewards[i] - r_max) / beta):
                continue
            accepted.append(i)
            taken.append(i)
            if len(accepted) == m:
                break
        remaining = [i for i in remaining if i not in set(taken)]
    return accepted


def distinct(texts: list[str]) -> list[int]:
    """Index of the first occurrence of each distinct text, in order (Algorithm 1's dict keys)."""
    seen: set[str] = set()
    out = []
    for i, t in enumerate(texts):
        if t not in seen:
            seen.add(t)
            out.append(i)
    return out


def first_round_pairs(accepted: list[int]) -> list[tuple[int, int]]:
    """RSO's "first-round-rank" (their Sec. 5.2, Table 2): the accepted samples paired in order, (1, 2),
    (3, 4), ...; each pair is then labelled by the ranker. An odd last sample is left unpaired."""
    return [(accepted[j], accepted[j + 1]) for j in range(0, len(accepted) - 1, 2)]
