"""The online methods' math (issue 27), against closed forms: INPO (its IPO limit; on a 3-arm bandit with a
non-transitive preference matrix, minimising its population loss gives the mirror-descent step), APO (on a
tabular problem with exact proximal steps the iterates follow Algorithm 1's recursion; α = 0 is iterative DPO
exactly; the LoRA form is the weight-space update), SuperHF's loss, MPO's loss, the REINFORCE leave-one-out
step (unbiased by exact enumeration) and Laidlaw et al.'s χ² estimator (its expectation 0.5625 on the issue's
example; value and slope continuous at the clip).

Run: pytest tests/test_losses_online.py -q     (seconds)

Expected values come from hand arithmetic or from closed forms computed here, never from the functions under
test; minimisations use L-BFGS in float64 on the population losses built from the registered losses.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from rpo import apo
from rpo.losses import check_hyperparameters, get_loss, ipo, loss_hyperparameters
from rpo.losses import online as ol

F64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=F64)


def minimise(loss_of, theta0: torch.Tensor) -> torch.Tensor:
    """argmin of a smooth function of a logit vector, by L-BFGS in float64 to a tight tolerance."""
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss_of(theta)
        value.backward()
        return value
    for _ in range(5):
        opt.step(closure)
    return theta.detach()


# --------------------------------------------------------------------------
# INPO
# --------------------------------------------------------------------------

def test_inpo_registry_and_validation():
    assert get_loss("inpo") is ol.inpo and loss_hyperparameters("inpo") == ("eta", "ratio")
    check_hyperparameters("inpo", {"eta": 0.005, "ratio": 1 / 3}, "config methods.inpo")
    with pytest.raises(ValueError, match="config methods.inpo: eta must be a finite number > 0"):
        check_hyperparameters("inpo", {"eta": 0.0, "ratio": 0.5}, "config methods.inpo")
    with pytest.raises(ValueError, match=r"ratio \(INPO's tau/eta\) must be in \[0, 1\]"):
        check_hyperparameters("inpo", {"eta": 0.1, "ratio": 1.5}, "config methods.inpo")


def test_inpo_at_a_hand_computed_point():
    # pi log-ratio (-10) - (-12) = 2; ref (-11) - (-11) = 0; previous (-9) - (-12) = 3; ratio 1/4:
    # h = 2 - 0.25 * 0 - 0.75 * 3 = -0.25; eta 0.5 -> target 1; loss (-1.25)^2 = 1.5625
    out = ol.inpo(policy_chosen_logps=t([-10.0]), policy_rejected_logps=t([-12.0]),
                  reference_chosen_logps=t([-11.0]), reference_rejected_logps=t([-11.0]),
                  chosen_lengths=t([3.0]), rejected_lengths=t([5.0]),
                  previous_chosen_logps=t([-9.0]), previous_rejected_logps=t([-12.0]), eta=0.5, ratio=0.25)
    torch.testing.assert_close(out, t([1.5625]), rtol=0, atol=1e-15)


def test_inpo_with_ratio_one_is_ipo_unnormalised():
    """τ/η = 1 drops π_t: (h − 1/(2η))² with h the DPO margin of SUMMED log-ratios, IPO's eq. 17 with β = η.
    rpo.losses.ipo divides each log-ratio by its length (TRL's form), so it equals INPO only at lengths 1."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr, qc, qr = (-20 * torch.rand(6, generator=g, dtype=F64) for _ in range(6))
    lc, lr = t([3, 7, 1, 9, 2, 4]), t([5, 2, 6, 1, 8, 3])
    eta = 0.25
    inpo_val = ol.inpo(policy_chosen_logps=pc, policy_rejected_logps=pr, reference_chosen_logps=rc,
                       reference_rejected_logps=rr, chosen_lengths=lc, rejected_lengths=lr,
                       previous_chosen_logps=qc, previous_rejected_logps=qr, eta=eta, ratio=1.0)
    h = (pc - rc) - (pr - rr)
    torch.testing.assert_close(inpo_val, (h - 1 / (2 * eta)) ** 2, rtol=1e-14, atol=1e-12)
    ones = torch.ones(6, dtype=F64)
    unnormalised_ipo = ipo(policy_chosen_logps=pc, policy_rejected_logps=pr, reference_chosen_logps=rc,
                           reference_rejected_logps=rr, chosen_lengths=ones, rejected_lengths=ones, beta=eta)
    torch.testing.assert_close(inpo_val, unnormalised_ipo, rtol=1e-14, atol=1e-12)
    normalised = ipo(policy_chosen_logps=pc, policy_rejected_logps=pr, reference_chosen_logps=rc,
                     reference_rejected_logps=rr, chosen_lengths=lc, rejected_lengths=lr, beta=eta)
    assert not torch.allclose(inpo_val, normalised)  # TRL's per-token form is another loss


# a non-transitive preference matrix: P[a, b] = P(a ≻ b), P + Pᵀ = 1 (0 beats 1, 1 beats 2, 2 beats 0)
PREF = t([[0.5, 0.8, 0.3], [0.2, 0.5, 0.6], [0.7, 0.4, 0.5]])


def inpo_population_loss(theta, pi_t, pi_ref, eta, ratio):
    """E_{y,y'∼π_t, I∼Bern(P(y≻y'))}[(h_t − (I − ½)/η)²] as pairs: the draw (a, b) labelled a ≻ b has
    probability 2 π_t(a) π_t(b) P(a ≻ b) for a ≠ b (either order of the draw), and enters the loss as the
    pair (chosen a, rejected b); a = b gives h = 0, a constant."""
    log_pi = torch.log_softmax(theta, -1)
    a, b = zip(*[(i, j) for i in range(3) for j in range(3) if i != j])
    a, b = list(a), list(b)
    w = 2 * pi_t[a] * pi_t[b] * PREF[a, b]
    losses = ol.inpo(policy_chosen_logps=log_pi[a], policy_rejected_logps=log_pi[b],
                     reference_chosen_logps=pi_ref.log()[a], reference_rejected_logps=pi_ref.log()[b],
                     chosen_lengths=torch.ones(6, dtype=F64), rejected_lengths=torch.ones(6, dtype=F64),
                     previous_chosen_logps=pi_t.log()[a], previous_rejected_logps=pi_t.log()[b],
                     eta=eta, ratio=ratio)
    return (w * losses).sum()


@pytest.mark.parametrize("eta,ratio", [(1.0, 1 / 3), (0.5, 0.0), (2.0, 1.0)])
def test_inpo_population_minimiser_is_the_mirror_descent_step(eta, ratio):
    assert torch.allclose(PREF + PREF.T, torch.ones(3, 3, dtype=F64))
    pi_t, pi_ref = t([0.5, 0.3, 0.2]), t([0.2, 0.3, 0.5])
    theta = minimise(lambda th: inpo_population_loss(th, pi_t, pi_ref, eta, ratio), torch.zeros(3, dtype=F64))
    # the closed form, written out: P(y ≻ π_t) = Σ_y' P[y, y'] π_t(y'); π ∝ π_t^{1-r} π_ref^r exp(P/η)
    wins = [sum(PREF[y, z].item() * pi_t[z].item() for z in range(3)) for y in range(3)]
    un = [pi_t[y].item() ** (1 - ratio) * pi_ref[y].item() ** ratio * math.exp(wins[y] / eta) for y in range(3)]
    expected = t([u / sum(un) for u in un])
    torch.testing.assert_close(torch.softmax(theta, -1), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(ol.inpo_mirror_descent_step(pi_t, pi_ref, PREF, eta=eta, ratio=ratio), expected,
                               rtol=0, atol=1e-12)
    # and it is not the starting policy: the step moved
    assert (torch.softmax(theta, -1) - pi_t).abs().max() > 1e-2


# --------------------------------------------------------------------------
# APO
# --------------------------------------------------------------------------

REWARD = t([1.0, 0.0, -0.5])  # Bradley-Terry preferences P(a ≻ b) = σ(r_a − r_b)


def dpo_proximal_step(pi_t: torch.Tensor, beta: float) -> torch.Tensor:
    """The exact proximal step of iterative DPO with reference π_t: the minimiser of the population DPO loss
    E_{y,y'∼π_t}[ℓ_DPO] over all policies on 3 arms (log-probabilities, normalised)."""
    dpo = get_loss("dpo")
    a, b = zip(*[(i, j) for i in range(3) for j in range(3) if i != j])
    a, b = list(a), list(b)
    w = 2 * pi_t[a] * pi_t[b] * torch.sigmoid(REWARD[a] - REWARD[b])
    ones = torch.ones(6, dtype=F64)

    def loss(theta):
        log_pi = torch.log_softmax(theta, -1)
        return (w * dpo(policy_chosen_logps=log_pi[a], policy_rejected_logps=log_pi[b],
                        reference_chosen_logps=pi_t.log()[a], reference_rejected_logps=pi_t.log()[b],
                        chosen_lengths=ones, rejected_lengths=ones, beta=beta)).sum()
    return torch.log_softmax(minimise(loss, pi_t.log()), -1)


def apo_iterates(alpha: float, rounds: int, beta: float, *, use_extrapolation: bool = True):
    """Algorithm 1 with exact proximal steps, the extrapolation done on the policy's parameters (its logits)."""
    pi = t([0.2, 0.3, 0.5])
    hat_prev = pi.log()  # π̂_1 = π_1 = π_ref
    out = []
    for _ in range(rounds):
        hat = dpo_proximal_step(pi, beta)
        theta = apo.extrapolate({"logits": hat}, {"logits": hat_prev}, alpha)["logits"] if use_extrapolation else hat
        pi, hat_prev = torch.softmax(theta, -1), hat
        out.append(pi)
    return out


def test_apo_iterates_follow_the_papers_recursion():
    beta, alpha = 1.0, 0.4
    got = apo_iterates(alpha, 3, beta)
    # the recursion in closed form: π̂_{t+1} ∝ π_t exp(r/β) (the DPO proximal step under Bradley-Terry), then
    # π_{t+1} ∝ π̂_{t+1} (π̂_{t+1}/π̂_t)^α
    pi = [0.2, 0.3, 0.5]
    hat_prev = pi[:]
    for t_ in range(3):
        hat = [p * math.exp(r / beta) for p, r in zip(pi, REWARD.tolist())]
        hat = [h / sum(hat) for h in hat]
        nxt = [h * (h / hp) ** alpha for h, hp in zip(hat, hat_prev)]
        pi, hat_prev = [n / sum(nxt) for n in nxt], hat
        torch.testing.assert_close(got[t_], t(pi), rtol=0, atol=1e-4)
    # momentum moves faster towards the best arm than iterative DPO
    assert got[-1][0] > apo_iterates(0.0, 3, beta)[-1][0] + 1e-3


def test_apo_with_alpha_zero_is_iterative_dpo_exactly():
    with_zero = apo_iterates(0.0, 3, 1.0)
    plain = apo_iterates(0.0, 3, 1.0, use_extrapolation=False)
    assert all(torch.equal(a, b) for a, b in zip(with_zero, plain))


def _write_adapter(d, state: dict, r: int, lora_alpha: float, use_rslora: bool = False):
    import json

    from safetensors.torch import save_file
    d.mkdir(parents=True)
    save_file(state, str(d / apo.ADAPTER_WEIGHTS))
    (d / apo.ADAPTER_CONFIG).write_text(json.dumps({"r": r, "lora_alpha": lora_alpha, "use_rslora": use_rslora,
                                                    "peft_type": "LORA", "target_modules": ["q_proj"]}))
    (d / "tokenizer.json").write_text("{}")
    return d


def test_apo_lora_extrapolation_is_the_weight_space_update(tmp_path):
    g = torch.Generator().manual_seed(1)
    m = "base_model.model.model.layers.1.self_attn.q_proj"

    def lora(r):
        return {f"{m}.lora_A.weight": torch.randn(r, 6, generator=g), f"{m}.lora_B.weight": torch.randn(5, r, generator=g)}
    new = _write_adapter(tmp_path / "new", lora(2), r=2, lora_alpha=8)        # scaling 4
    old = _write_adapter(tmp_path / "old", lora(3), r=3, lora_alpha=3, use_rslora=True)  # scaling 3/sqrt(3)
    alpha = 0.3
    info = apo.extrapolate_lora(new, old, alpha, tmp_path / "out")
    assert info["rank"] == 5 and (tmp_path / "out" / "tokenizer.json").is_file()
    want = {k: (1 + alpha) * apo.lora_delta(new)[k] - alpha * apo.lora_delta(old)[k] for k in apo.lora_delta(new)}
    # by hand for the one module: ΔW = s B A
    s_new, s_old = 8 / 2, 3 / math.sqrt(3)
    st_new, st_old = (apo._read_adapter(x)[1] for x in (new, old))
    by_hand = ((1 + alpha) * s_new * st_new[f"{m}.lora_B.weight"].double() @ st_new[f"{m}.lora_A.weight"].double()
               - alpha * s_old * st_old[f"{m}.lora_B.weight"].double() @ st_old[f"{m}.lora_A.weight"].double())
    got = apo.lora_delta(tmp_path / "out")
    torch.testing.assert_close(got[m], by_hand, rtol=1e-5, atol=1e-5)  # the adapters hold float32
    torch.testing.assert_close(got[m], want[m], rtol=1e-5, atol=1e-5)
    # round 1: the previous proximal policy is the reference (ΔW = 0): ΔW scales by 1 + α, rank kept
    info = apo.extrapolate_lora(new, None, alpha, tmp_path / "first")
    assert info["rank"] == 2
    torch.testing.assert_close(apo.lora_delta(tmp_path / "first")[m], (1 + alpha) * apo.lora_delta(new)[m],
                               rtol=1e-5, atol=1e-5)


def test_apo_full_extrapolation(tmp_path):
    from safetensors.torch import load_file, save_file
    for name, w in (("new", 3.0), ("old", 1.0)):
        (tmp_path / name).mkdir()
        save_file({"w": torch.full((2, 2), w), "b": torch.tensor([w, -w])}, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text("{}")
    apo.extrapolate_full(tmp_path / "new", tmp_path / "old", 0.5, tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    torch.testing.assert_close(out["w"], torch.full((2, 2), 4.0))  # 3 + 0.5 (3 - 1)
    torch.testing.assert_close(out["b"], torch.tensor([4.0, -4.0]))


# --------------------------------------------------------------------------
# SuperHF
# --------------------------------------------------------------------------

def test_superhf_loss_parts():
    nll, kl = t([6.0, 3.0]), t([0.2, -0.1])
    # 6/9 + 0.5*0.2 ; 3/9 + 0.5*max(-0.1, 0)
    out = ol.superhf(token_nll=nll, step_tokens=9, kl_per_token=kl, kl_coef=0.5)
    torch.testing.assert_close(out, t([6 / 9 + 0.1, 3 / 9]), rtol=0, atol=1e-15)
    # kl_coef 0: the step's token-mean NLL
    assert math.isclose(float(ol.superhf(token_nll=nll, step_tokens=9, kl_per_token=kl, kl_coef=0.0).sum()), 1.0)


def test_forward_kl_per_token_by_hand():
    # one sequence, two positions, vocabulary 2; only position 0 predicts a completion token
    p = torch.log(t([[[0.5, 0.5], [0.9, 0.1]]]))
    q = torch.log(t([[[0.8, 0.2], [0.1, 0.9]]]))
    mask = torch.tensor([[True, False]])
    kl = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)  # KL(q || p) at position 0
    torch.testing.assert_close(ol.forward_kl_per_token(p, q, mask), t([kl]), rtol=0, atol=1e-12)
    assert float(ol.forward_kl_per_token(q, q, torch.tensor([[True, True]]))) == 0.0


# --------------------------------------------------------------------------
# MPO
# --------------------------------------------------------------------------

def test_mpo_weight_and_regulariser():
    z = t([0.0])
    # π = μ on the pair: the self-normalised weight of y_w is 1/2
    out = ol.mpo(policy_chosen_logps=t([-5.0]), policy_rejected_logps=t([-7.0]), reference_chosen_logps=z,
                 reference_rejected_logps=z, chosen_lengths=z, rejected_lengths=z,
                 previous_chosen_logps=t([-5.0]), previous_rejected_logps=t([-7.0]),
                 reference_sample_logps=t([-3.0]), kl_coef=0.1)
    torch.testing.assert_close(out, t([-0.5 + 0.3]), rtol=0, atol=1e-15)
    # importance weights by hand: (π/μ)(y_w) = e^1, (π/μ)(y_l) = e^-1 -> w = e / (e + 1/e)
    out = ol.mpo(policy_chosen_logps=t([-4.0]), policy_rejected_logps=t([-8.0]), reference_chosen_logps=z,
                 reference_rejected_logps=z, chosen_lengths=z, rejected_lengths=z,
                 previous_chosen_logps=t([-5.0]), previous_rejected_logps=t([-7.0]),
                 reference_sample_logps=t([-3.0]), kl_coef=0.0)
    torch.testing.assert_close(out, t([-math.e / (math.e + 1 / math.e)]), rtol=0, atol=1e-14)


# --------------------------------------------------------------------------
# REINFORCE leave-one-out and the χ² / KL regularisers
# --------------------------------------------------------------------------

def test_rloo_advantages_by_hand():
    a = ol.rloo_advantages(t([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]]))
    torch.testing.assert_close(a, t([[1.0, -1 / 3, -1 / 3, -1 / 3], [0.0, 0.0, 0.0, 0.0]]), rtol=0, atol=1e-15)


def test_rloo_gradient_is_unbiased_by_exact_enumeration():
    """E over every K-tuple of samples of the RLOO gradient (at θ = the sampling policy) = ∇ E_π[r]."""
    reward = t([1.0, 0.2, -0.3])
    theta = t([0.3, -0.2, 0.5]).requires_grad_(True)
    k = 3
    pi = torch.softmax(theta, -1).detach()
    expected_grad = torch.autograd.grad((torch.softmax(theta, -1) * reward).sum(), theta)[0]
    total = torch.zeros(3, dtype=F64)
    for ys in itertools.product(range(3), repeat=k):
        prob = math.prod(pi[y].item() for y in ys)
        logp = torch.log_softmax(theta, -1)[list(ys)].unsqueeze(0)
        loss = ol.reinforce_loo(logps=logp, behaviour_logps=logp.detach(), rewards=reward[list(ys)].unsqueeze(0))
        total += prob * -torch.autograd.grad(loss.sum(), theta)[0]
    torch.testing.assert_close(total, expected_grad, rtol=0, atol=1e-12)


CHI2_PI, CHI2_REF = t([0.5, 0.5]), t([0.8, 0.2])


def test_chi2_estimator_exact_expectation_is_the_issues_value():
    ell = CHI2_PI.log() - CHI2_REF.log()
    up, down = ol.occupancy_terms(ell)
    assert math.isclose(float((CHI2_PI * (up + down)).sum()), 0.5625, rel_tol=0, abs_tol=1e-12)
    assert math.isclose(float((CHI2_PI * down).sum()), 0.0, abs_tol=1e-12)  # the control variate's mean
    # KL with the same control variate: exactly KL(π‖π_ref)
    kl = float((CHI2_PI * (CHI2_PI / CHI2_REF).log()).sum())
    assert math.isclose(float((CHI2_PI * (ell + down)).sum()), kl, abs_tol=1e-12)
    # on samples: the estimator's mean approaches 0.5625, and the control variate lowers the variance
    g = torch.Generator().manual_seed(0)
    ys = torch.multinomial(CHI2_PI, 400_000, replacement=True, generator=g)
    assert abs(float(ol.chi2_estimate(ell[ys])) - 0.5625) < 5e-3
    u, d = ol.occupancy_terms(ell[ys])
    assert float((u + d).var()) < float(u.var())


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_chi2_terms_value_and_slope_continuous_at_the_clip(sign):
    c, eps = ol.OCCUPANCY_CLIP, 1e-6
    x = (sign * t([c - eps, c + eps])).requires_grad_(True)
    up, down = ol.occupancy_terms(x)
    term = up if sign > 0 else down  # the term whose exponential reaches e^c
    slope = torch.autograd.grad(term.sum(), x)[0]
    assert abs(float((term[1] - term[0]).detach())) < 2 * eps * math.exp(c) * 1.01  # no jump
    torch.testing.assert_close(slope[0], slope[1], rtol=1e-5, atol=0)  # the tangent continues the exponential
    assert math.isclose(abs(float(slope[0])), math.exp(c), rel_tol=1e-5)
    # far past the clip the extension is linear (finite, not e^x)
    far = ol.occupancy_terms(t([sign * 50.0]))[0 if sign > 0 else 1]
    assert math.isclose(float(far), math.exp(c) * (1 + 50 - c) - 1, rel_tol=1e-12)


def test_regularised_rloo_losses():
    logps = t([[-3.0, -4.0]]).requires_grad_(True)
    ref = t([[-3.5, -3.0]])
    rewards = t([[1.0, 0.0]])
    ell = logps.detach() - ref
    pg = -(t([[1.0, -1.0]]) * 1.0).mean()  # ratio 1 at θ = μ
    kl = ol.rloo_kl(logps=logps, behaviour_logps=logps.detach(), reference_logps=ref, rewards=rewards, kl_coef=0.2)
    by_hand_kl = float((ell + torch.expm1(-ell)).mean())
    assert math.isclose(float(kl), float(pg) + 0.2 * by_hand_kl, abs_tol=1e-12)
    chi = ol.rloo_chi2(logps=logps, behaviour_logps=logps.detach(), reference_logps=ref, rewards=rewards, chi2_coef=0.5)
    by_hand_chi = float((torch.expm1(ell) + torch.expm1(-ell)).mean())
    assert math.isclose(float(chi), float(pg) + 0.5 * math.sqrt(by_hand_chi), abs_tol=1e-12)
    assert get_loss("rloo_chi2") is ol.rloo_chi2 and loss_hyperparameters("rloo_chi2") == ("chi2_coef",)
