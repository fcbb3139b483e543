"""The fusion math of eval/fusion.py (proxy tuning, Dynamic Logits Fusion), checked against closed forms and an
independent float64 computation with scipy on small random logits.

Run: pytest tests/test_fusion.py -q      (seconds)
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.special import log_softmax as np_log_softmax
from scipy.special import softmax as np_softmax
from scipy.stats import entropy

from eval import fusion

GRID = fusion.grid_values()


def random_logits(*shape, seed=0, scale=2.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def np_objective(m_large, m_small, m_experts, alpha):
    """Fan et al.'s L for one row, from scratch: P̃ = softmax(M_L + Σ α_t (M_t − M_S)); scipy's entropy(p, q) is
    KL(p‖q)."""
    p = np_softmax(m_large)
    q = np_softmax(m_small)
    p_tilde = np_softmax(m_large + sum(a * (m - m_small) for a, m in zip(alpha, m_experts)))
    total = 0.0
    for m in m_experts:
        q_t = np_softmax(m)
        total += (entropy(p_tilde, p) - entropy(q_t, q)) ** 2 + (entropy(p, p_tilde) - entropy(q, q_t)) ** 2
    return total


def test_grid_is_the_papers():
    assert GRID == [round(0.1 * i, 10) for i in range(21)] and GRID[10] == 1.0 and len(GRID) == 21
    assert fusion.grid_values(1.0, 0.5) == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="not a multiple of step"):
        fusion.grid_values(1.0, 0.3)


def test_kl_matches_scipy():
    a, b = random_logits(3, 7, seed=1), random_logits(3, 7, seed=2)
    got = fusion.kl(torch.log_softmax(a, -1), torch.log_softmax(b, -1))
    want = [entropy(np_softmax(a[i].numpy()), np_softmax(b[i].numpy())) for i in range(3)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-14)


def test_objective_terms_match_scipy():
    ml, ms = random_logits(4, 9, seed=3), random_logits(4, 9, seed=4)
    experts = [random_logits(4, 9, seed=5), random_logits(4, 9, seed=6)]
    alpha = torch.tensor([[0.3, 1.7]] * 4, dtype=torch.float64)
    lp = [torch.log_softmax(x, -1) for x in (ml, ms, *experts)]
    fused = fusion.fused_logprobs(lp[0], [e - lp[1] for e in lp[2:]], alpha)
    fwd, rev = fusion.expert_targets(lp[1], lp[2:])
    got = fusion.dlf_objective(fused, lp[0], fwd, rev)
    want = [np_objective(ml[i].numpy(), ms[i].numpy(), [e[i].numpy() for e in experts], [0.3, 1.7]) for i in range(4)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
    # and the fused distribution is eq. 2 on the raw logits (log-softmax constants cancel)
    raw = np_log_softmax((ml + 0.3 * (experts[0] - ms) + 1.7 * (experts[1] - ms)).numpy(), axis=-1)
    np.testing.assert_allclose(fused.numpy(), raw, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n_experts", [1, 2, 3])
def test_search_is_the_brute_force_argmin(n_experts):
    rows = 6
    ml, ms = random_logits(rows, 11, seed=10), random_logits(rows, 11, seed=11)
    experts = [ms + random_logits(rows, 11, seed=20 + t, scale=1.0) for t in range(n_experts)]
    lp = [torch.log_softmax(x, -1) for x in (ml, ms, *experts)]
    alpha, loss = fusion.search_alpha(lp[0], lp[1], lp[2:], GRID)
    for i in range(rows):
        # the paper's multi-task search: one expert at a time, candidates in the order (expert, ascending alpha)
        cands = [[g if s == t else 0.0 for s in range(n_experts)] for t in range(n_experts) for g in GRID]
        values = [np_objective(ml[i].numpy(), ms[i].numpy(), [e[i].numpy() for e in experts], c) for c in cands]
        best = int(np.argmin(values))
        assert alpha[i].tolist() == pytest.approx(cands[best]), (i, alpha[i], cands[best])
        assert loss[i].item() == pytest.approx(values[best], rel=1e-9, abs=1e-12)
        assert (alpha[i] != 0).sum() <= 1


def test_ties_pick_the_first_grid_point():
    ml, ms = random_logits(3, 8, seed=30), random_logits(3, 8, seed=31)
    lp_large, lp_small = torch.log_softmax(ml, -1), torch.log_softmax(ms, -1)
    # an expert equal to the small model: every alpha gives P̃ = P and L = 0, a 21-way tie -> alpha 0
    alpha, loss = fusion.search_alpha(lp_large, lp_small, [lp_small.clone()], GRID)
    assert alpha.tolist() == [[0.0]] * 3 and loss.tolist() == [0.0] * 3
    # two identical experts: expert 2's candidates tie expert 1's, so only expert 1 is ever chosen
    lp_e = torch.log_softmax(ms + random_logits(3, 8, seed=32), -1)
    one, _ = fusion.search_alpha(lp_large, lp_small, [lp_e], GRID)
    two, _ = fusion.search_alpha(lp_large, lp_small, [lp_e, lp_e.clone()], GRID)
    assert two[:, 1].tolist() == [0.0] * 3 and two[:, 0].tolist() == one[:, 0].tolist()
    assert (one[:, 0] > 0).any()  # the case is not trivial: some row moves


def test_large_equal_to_small_limits():
    """With the large model the small one and one expert: α = 1 gives the expert's distribution, α = 0 the
    large model's, and the dynamic search finds α = 1 (there L = 0 exactly)."""
    m, expert = random_logits(5, 13, seed=40), random_logits(5, 13, seed=41)
    lp_ex = torch.log_softmax(expert, -1)
    one, a1 = fusion.fuse(m, m, [expert], 1.0, GRID)
    zero, a0 = fusion.fuse(m, m, [expert], 0.0, GRID)
    torch.testing.assert_close(one, lp_ex, rtol=0, atol=1e-12)
    torch.testing.assert_close(zero, torch.log_softmax(m, -1), rtol=0, atol=1e-12)
    assert a1.tolist() == [[1.0]] * 5 and a0.tolist() == [[0.0]] * 5
    dyn, a = fusion.fuse(m, m, [expert], fusion.DYNAMIC, GRID)
    assert a.tolist() == [[1.0]] * 5
    torch.testing.assert_close(dyn, lp_ex, rtol=0, atol=1e-12)


def test_fixed_alpha_is_proxy_tuning_on_raw_logits():
    ml, ms, me = random_logits(2, 3, 10, seed=50), random_logits(2, 3, 10, seed=51), random_logits(2, 3, 10, seed=52)
    got, alpha = fusion.fuse(ml, ms, [me], 1.0, GRID)  # Liu et al.: large + (small tuned − small)
    torch.testing.assert_close(got, torch.log_softmax(ml + me - ms, -1), rtol=0, atol=1e-12)
    assert alpha.shape == (2, 3, 1)
    got, _ = fusion.fuse(ml, None, [], fusion.DYNAMIC, GRID)  # no experts: the large model
    torch.testing.assert_close(got, torch.log_softmax(ml, -1), rtol=0, atol=0)


def test_chunks_change_nothing(monkeypatch):
    ml, ms = random_logits(7, 5, 12, seed=60), random_logits(7, 5, 12, seed=61)
    experts = [random_logits(7, 5, 12, seed=62), random_logits(7, 5, 12, seed=63)]
    whole, a_whole = fusion.fuse(ml, ms, experts, fusion.DYNAMIC, GRID)
    monkeypatch.setattr(fusion, "CHUNK_ELEMENTS", 12 * 3)  # 3 rows at a time, 35 rows
    chunked, a_chunked = fusion.fuse(ml, ms, experts, fusion.DYNAMIC, GRID)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    assert torch.equal(a_chunked, a_whole) and a_whole.shape == (7, 5, 2)


def test_float32_logits_are_fused_in_float32():
    ml, ms, me = (random_logits(2, 6, seed=s).float() for s in (70, 71, 72))
    got, _ = fusion.fuse(ml.to(torch.bfloat16), ms.to(torch.bfloat16), [me.to(torch.bfloat16)], 1.0, GRID)
    assert got.dtype == torch.float32


def test_alpha_values_checked():
    assert fusion.check_alpha("dynamic") == "dynamic" and fusion.check_alpha(1) == 1.0
    for bad in ("fixed", -0.5, True, None):
        with pytest.raises(ValueError, match="expected 'dynamic' or a number >= 0"):
            fusion.check_alpha(bad, "fusion.models.x.alpha")


def test_search_objective_decreases_towards_the_expert_shift():
    """A closed form: P, Q uniform over 2 tokens and Q_t = (σ(d), 1−σ(d)); then the fused distribution at α is
    (σ(αd), ...) and L(α) = 2·(KL(σ(αd)‖½) − KL(σ(d)‖½))² + ..., zero exactly at α = 1."""
    d = 1.3
    ml = torch.zeros(1, 2, dtype=torch.float64)
    me = torch.tensor([[d, 0.0]], dtype=torch.float64)
    lp = [torch.log_softmax(x, -1) for x in (ml, ml, me)]
    fwd, rev = fusion.expert_targets(lp[1], lp[2:])
    values = []
    for g in GRID:
        values.append(fusion.dlf_objective(fusion.fused_logprobs(lp[0], [lp[2] - lp[1]], g), lp[0], fwd, rev).item())
    assert values[10] == pytest.approx(0.0, abs=1e-24)
    assert all(a > b for a, b in itertools.pairwise(values[:11]))  # falls to α = 1, then rises
    assert all(a < b for a, b in itertools.pairwise(values[10:]))


def test_zero_probabilities_and_non_finite_logits():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64))  # log 0 = -inf
    logq = torch.log(torch.tensor([[0.25, 0.25, 0.5]], dtype=torch.float64))
    assert fusion.kl(logp, logq).item() == pytest.approx(entropy([0.5, 0.5, 0.0], [0.25, 0.25, 0.5]))
    bad = torch.tensor([[0.0, float("nan"), 1.0]])
    with pytest.raises(ValueError, match="fused log-probabilities are not finite"):
        fusion.fuse(bad, torch.zeros(1, 3), [torch.ones(1, 3)], 1.0, GRID)
