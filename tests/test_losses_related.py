"""The related methods' losses (ipo, exo_pair, hinge, minor_dpo, ada_dpo) and their "+sft" combinations:
closed forms, limits, stability, length and shape checks, and parity with TRL's DPOTrainer losses. What
every loss shares (a reference across dtypes, gradcheck, the registry and its validation):
tests/test_losses.py.

Run: pytest tests/test_losses_related.py -q     (the TRL parity test skips without trl; -s shows its values)

Expected values come from hand arithmetic (math.log / math.exp) or from an independent solve (ternary
search over tau for ada_dpo), never from the functions under test.
"""

import collections
import math
import types

import pytest
import torch
from helpers.losses import (ALL_HYPERS, HYPERS, LOG2, ada_objective, batch, call, f64, grads, random_batch,
                            reference_loss)

from rpo.losses import RELATED_LOSSES, TENSOR_ARGS, dpo, get_loss, rpo


# --------------------------------------------------------------------------
# IPO
# --------------------------------------------------------------------------

def test_ipo_at_hand_computed_points():
    # beta = 0.5 -> target 1/(2 beta) = 1
    # example 0: chosen log-ratio -10 - -11 = 1 over 4 tokens -> 0.25;
    #            rejected -12 - -11 = -1 over 2 tokens -> -0.5;  h_norm = 0.75
    #            loss = (0.75 - 1)^2 = 0.0625   (unnormalised h = 2 would give (2 - 1)^2 = 1)
    # example 1: chosen -20 - -18 = -2 over 8 -> -0.25; rejected -15 - -16 = 1 over 4 -> 0.25
    #            h_norm = -0.5;  loss = (-0.5 - 1)^2 = 2.25
    b = batch(pc=[-10.0, -20.0], pr=[-12.0, -15.0], rc=[-11.0, -18.0], rr=[-11.0, -16.0],
              lc=[4, 8], lr=[2, 4])
    torch.testing.assert_close(call("ipo", b, {"beta": 0.5}), f64([0.0625, 2.25]), rtol=0, atol=1e-15)


def test_ipo_minimum_at_target_with_zero_gradient():
    # beta = 0.25 -> target 2. chosen log-ratio 6 over 3 tokens = 2, rejected 0 -> h_norm = 2.
    b = batch(pc=[-4.0], pr=[-7.0], rc=[-10.0], rr=[-7.0], lc=[3], lr=[5])
    assert call("ipo", b, {"beta": 0.25}).item() == 0.0
    for g in grads("ipo", b, {"beta": 0.25}):
        assert g.abs().max().item() == 0.0
    # moving h_norm either way raises the loss
    for d in (-0.3, 0.3):
        moved = dict(b, policy_chosen_logps=b["policy_chosen_logps"] + 3 * d)  # h_norm = 2 + d
        torch.testing.assert_close(call("ipo", moved, {"beta": 0.25}), f64([d * d]), rtol=1e-12, atol=1e-15)


def test_ipo_normalises_each_sequence_by_its_own_length():
    # doubling a response's summed log-ratio and its length leaves the loss unchanged
    b = random_batch(n=4, seed=2)
    b2 = dict(b, policy_chosen_logps=2 * b["policy_chosen_logps"] - b["reference_chosen_logps"],
              chosen_lengths=2 * b["chosen_lengths"])
    torch.testing.assert_close(call("ipo", b2, HYPERS["ipo"]), call("ipo", b, HYPERS["ipo"]),
                               rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------
# EXO (pairwise)
# --------------------------------------------------------------------------

def test_exo_pair_at_hand_computed_points():
    # example 0: h = 0 -> q = (1/2, 1/2); epsilon = 0.1:
    #   0.5 (log 0.5 - log 0.9) + 0.5 (log 0.5 - log 0.1) = log 0.5 - 0.5 log(0.09)
    #   = -0.6931471806 + 1.2039728043 = 0.5108256238
    b = batch(pc=[-5.0], pr=[-6.0], rc=[-5.0], rr=[-6.0])
    expected = math.log(0.5) - 0.5 * math.log(0.09)
    assert abs(expected - 0.5108256238) < 1e-10
    torch.testing.assert_close(call("exo_pair", b, {"beta": 0.5, "epsilon": 0.1}), f64([expected]),
                               rtol=1e-14, atol=1e-15)
    # example 1: beta h = 0.5 * 2 log 3 = log 3 -> q = (3/4, 1/4) = p for epsilon = 1/4: KL = 0, the minimum
    b = batch(pc=[2 * math.log(3.0)], pr=[0.0], rc=[0.0], rr=[0.0])
    assert abs(call("exo_pair", b, {"beta": 0.5, "epsilon": 0.25}).item()) < 1e-15
    for g in grads("exo_pair", b, {"beta": 0.5, "epsilon": 0.25}):
        assert g.abs().max().item() < 1e-15


@pytest.mark.parametrize("epsilon", [1e-3, 1e-6])
def test_exo_pair_gradient_is_dpo_direction_times_positive_factor(epsilon):
    # d EXO / d h = beta q_c q_r (beta h - log((1 - eps)/eps));  d DPO / d h = -beta q_r
    # so EXO's gradient = DPO's * q_c (log((1 - eps)/eps) - beta h), positive for beta h below the target
    beta = 0.1
    # beta h in [-7, 7]: below log((1 - eps)/eps) = 13.8 for eps = 1e-6, so the factor is positive;
    # for eps = 1e-3 (6.9) the identity holds but a margin past EXO's minimum flips the sign
    b = random_batch(n=8, seed=4)
    g_exo = grads("exo_pair", b, {"beta": beta, "epsilon": epsilon})
    g_dpo = grads("dpo", b, {"beta": beta})
    z = beta * ((b["policy_chosen_logps"] - b["reference_chosen_logps"])
                - (b["policy_rejected_logps"] - b["reference_rejected_logps"]))
    factor = torch.sigmoid(z) * (math.log((1 - epsilon) / epsilon) - z)
    for ge, gd in zip(g_exo, g_dpo):
        torch.testing.assert_close(ge, gd * factor, rtol=1e-10, atol=1e-14)
    if epsilon == 1e-6:
        assert (factor > 0).all()


# --------------------------------------------------------------------------
# hinge
# --------------------------------------------------------------------------

def test_hinge_at_hand_computed_points_and_flat_beyond_margin():
    # beta (RSO's gamma) = 0.5; h = 2, -3, 1, 4 -> 1 - 0.5 h = 0, 2.5, 0.5, -1 -> max(0, .) = 0, 2.5, 0.5, 0
    b = batch(pc=[-1.0, -8.0, -3.0, 0.0], pr=[-3.0, -5.0, -4.0, -4.0], rc=[0.0] * 4, rr=[0.0] * 4)
    torch.testing.assert_close(call("hinge", b, {"beta": 0.5}), f64([0.0, 2.5, 0.5, 0.0]), rtol=0, atol=0)
    g = grads("hinge", b, {"beta": 0.5})
    # zero gradient where gamma h >= 1 (examples 0 and 3), -/+ gamma on pc/pr elsewhere
    torch.testing.assert_close(g[0], f64([0.0, -0.5, -0.5, 0.0]), rtol=0, atol=0)
    torch.testing.assert_close(g[1], f64([0.0, 0.5, 0.5, 0.0]), rtol=0, atol=0)


# --------------------------------------------------------------------------
# MinorDPO
# --------------------------------------------------------------------------

def test_minor_dpo_equals_dpo_when_rejected_logratio_nonnegative():
    b = random_batch(n=8, seed=5)
    # make pr - rr >= 0 everywhere (and exactly 0 for one example)
    b["policy_rejected_logps"] = b["reference_rejected_logps"] + torch.linspace(0.0, 5.0, 8, dtype=torch.float64)
    assert torch.equal(call("minor_dpo", b, {"beta": 0.3}), dpo(**b, beta=0.3))


def test_minor_dpo_clamps_negative_rejected_logratio():
    # beta = 0.5, chosen log-ratio 1, rejected log-ratio -1:
    #   minor_dpo = -log sigmoid(0.5 * (1 - max(0, -1))) = log(1 + e^-0.5) = 0.4740769842
    #   dpo would be -log sigmoid(0.5 * 2) = log(1 + e^-1) = 0.3132616875
    b = batch(pc=[-10.0], pr=[-12.0], rc=[-11.0], rr=[-11.0])
    expected = math.log1p(math.exp(-0.5))
    assert abs(expected - 0.4740769842) < 1e-10
    torch.testing.assert_close(call("minor_dpo", b, {"beta": 0.5}), f64([expected]), rtol=1e-14, atol=1e-15)
    assert abs(dpo(**b, beta=0.5).item() - 0.3132616875) < 1e-10
    g = grads("minor_dpo", b, {"beta": 0.5})
    assert g[1].item() == 0.0 and g[3].item() == 0.0  # no push on the rejected response any more
    # d/d pc = -beta sigmoid(-beta * 1) = -0.5 * sigmoid(-0.5)
    assert abs(g[0].item() + 0.5 / (1 + math.exp(0.5))) < 1e-15


# --------------------------------------------------------------------------
# Ada-DPO
# --------------------------------------------------------------------------

@pytest.mark.parametrize("rho", [0.0, 0.2, 1.0])
def test_ada_dpo_with_unit_interval_is_dpo_plus_constant(rho):
    # tau0 = tau_max = 1 fixes tau = 1: -log sigmoid(beta h) + (rho - log 2)
    b = random_batch(n=8, seed=6)
    out = call("ada_dpo", b, {"beta": 0.3, "tau0": 1.0, "tau_max": 1.0, "rho": rho})
    torch.testing.assert_close(out, dpo(**b, beta=0.3) + (rho - LOG2), rtol=1e-14, atol=1e-14)
    g_ada, g_dpo = grads("ada_dpo", b, {"beta": 0.3, "tau0": 1.0, "tau_max": 1.0, "rho": rho}), grads("dpo", b, {"beta": 0.3})
    for ga, gd in zip(g_ada, g_dpo):
        torch.testing.assert_close(ga, gd, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("rho,bound", [(0.0, "tau_max"), (LOG2, "tau0"), (1.5, "tau0")])
def test_ada_dpo_tau_at_bounds_as_rho_varies(rho, bound):
    # d/dtau of the objective is H(sigmoid(z/tau)) - log 2 + rho with 0 <= H <= log 2:
    # rho = 0 -> never positive -> tau = tau_max;  rho >= log 2 -> never negative -> tau = tau0
    beta, tau0, tau_max = 0.5, 0.1, 5.0
    b = random_batch(n=8, seed=7)
    b["policy_chosen_logps"][0] = b["reference_chosen_logps"][0] + (
        b["policy_rejected_logps"][0] - b["reference_rejected_logps"][0])  # h = 0 for one pair
    tau = {"tau0": tau0, "tau_max": tau_max}[bound]
    h = ((b["policy_chosen_logps"] - b["reference_chosen_logps"])
         - (b["policy_rejected_logps"] - b["reference_rejected_logps"])).tolist()
    expected = [ada_objective(beta * hi, tau, rho) for hi in h]
    out = call("ada_dpo", b, {"beta": beta, "tau0": tau0, "tau_max": tau_max, "rho": rho})
    torch.testing.assert_close(out, f64(expected), rtol=1e-13, atol=1e-13)


def test_ada_dpo_interior_point_by_hand():
    # rho = log 2 - H(3/4) puts the unconstrained optimum at z / tau = u with sigmoid(u) = 3/4, u = log 3:
    #   H(3/4) = -(3/4) log(3/4) - (1/4) log(1/4) = 0.5623351446;  rho = 0.6931471806 - 0.5623351446 = 0.1308120360
    # beta = 0.5, h = 4 log 3 -> z = 2 log 3 -> tau* = z / log 3 = 2, inside [0.1, 5]
    #   loss = -2 log(3/4) + (rho - log 2) * 2 = 2 (0.2876820725 - 0.5623351446) = -0.5493061443
    #        (= -z sigmoid(-u) = -2 log 3 / 4)
    h_of_34 = -0.75 * math.log(0.75) - 0.25 * math.log(0.25)
    rho = LOG2 - h_of_34
    assert abs(rho - 0.1308120360) < 1e-10
    hp = {"beta": 0.5, "tau0": 0.1, "tau_max": 5.0, "rho": rho}
    b = batch(pc=[4 * math.log(3.0) - 7.0], pr=[-3.0], rc=[-7.0], rr=[-3.0])
    expected = -0.5 * math.log(3.0)
    assert abs(expected + 0.5493061443) < 1e-10
    torch.testing.assert_close(call("ada_dpo", b, hp), f64([expected]), rtol=1e-12, atol=1e-14)
    # Danskin: d/dh = -beta sigmoid(-z / tau*) = -0.5 * 1/4 at the optimal tau* = 2
    g = grads("ada_dpo", b, hp)
    torch.testing.assert_close(torch.stack([x[0] for x in g]), f64([-0.125, 0.125, 0.125, -0.125]),
                               rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("rho", [0.01, 0.2, 0.5, 0.69])
def test_ada_dpo_is_the_minimum_over_tau(rho):
    # against an independent solve (ternary search), margins spanning both bounds and the interior
    hp = {"beta": 0.5, "tau0": 0.1, "tau_max": 5.0, "rho": rho}
    b = random_batch(n=16, seed=8)
    out = call("ada_dpo", b, hp)
    torch.testing.assert_close(out, f64(reference_loss("ada_dpo", b, hp)), rtol=1e-12, atol=1e-12)
    # and no tau on a grid does better
    z = 0.5 * ((b["policy_chosen_logps"] - b["reference_chosen_logps"])
               - (b["policy_rejected_logps"] - b["reference_rejected_logps"]))
    taus = torch.linspace(0.1, 5.0, 4001, dtype=torch.float64).unsqueeze(1)
    grid = -taus * torch.nn.functional.logsigmoid(z / taus) + (rho - LOG2) * taus
    assert (out <= grid.min(0).values + 1e-12).all()


# --------------------------------------------------------------------------
# +sft
# --------------------------------------------------------------------------

def test_dpo_plus_sft_is_rpo():
    b = random_batch(n=8, seed=9)
    assert torch.equal(get_loss("dpo+sft")(**b, beta=0.1, eta=0.005), rpo(**b, beta=0.1, eta=0.005))


@pytest.mark.parametrize("base", list(RELATED_LOSSES))
def test_plus_sft_adds_eta_beta_summed_nll(base):
    b = random_batch(n=6, seed=10)
    hp, eta = HYPERS[base], 0.3
    plain = call(base, b, hp)
    with_sft = call(f"{base}+sft", b, {**hp, "eta": eta})
    torch.testing.assert_close(with_sft, plain + eta * hp["beta"] * (-b["policy_chosen_logps"]),
                               rtol=1e-14, atol=1e-12)
    assert torch.equal(call(f"{base}+sft", b, {**hp, "eta": 0.0}), plain)
    g_sft, g_plain = grads(f"{base}+sft", b, {**hp, "eta": eta}), grads(base, b, hp)
    torch.testing.assert_close(g_sft[0], g_plain[0] - eta * hp["beta"], rtol=1e-12, atol=1e-12)
    for gs, gp in zip(g_sft[1:], g_plain[1:]):
        torch.testing.assert_close(gs, gp, rtol=0, atol=0)


def test_plus_sft_keeps_a_keyword_only_signature():
    b = random_batch(n=2)
    fn = get_loss("ipo+sft")
    with pytest.raises(TypeError):
        fn(*[b[k] for k in TENSOR_ARGS], 0.1, 0.2)
    with pytest.raises(TypeError):
        fn(**b, beta=0.1)  # eta missing
    with pytest.raises(TypeError):
        fn(**b, beta=0.1, eta=0.1, alpha=0.2)


# --------------------------------------------------------------------------
# stability
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(RELATED_LOSSES))
def test_large_margins_are_finite(name):
    # beta * h = -/+ 1000 in float32
    b = batch(pc=[-1000.0, 0.0], pr=[0.0, -1000.0], rc=[0.0, 0.0], rr=[0.0, 0.0], dtype=torch.float32)
    hp = dict(HYPERS[name], beta=1.0)
    out = call(name, b, hp)
    assert torch.isfinite(out).all(), out
    assert all(torch.isfinite(g).all() for g in grads(name, b, hp))


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------

def test_ipo_rejects_nonpositive_lengths_and_bad_shapes():
    b = random_batch(n=3)
    b["rejected_lengths"] = torch.tensor([4, 0, 2])
    with pytest.raises(ValueError, match=r"rejected_lengths must be > 0 for every example, got \[4, 0, 2\]"):
        call("ipo", b, {"beta": 0.1})
    call("hinge", b, {"beta": 0.1})  # the other losses do not use the lengths
    b = random_batch(n=4)
    b["policy_rejected_logps"] = b["policy_rejected_logps"][:3]
    for name in [*RELATED_LOSSES, "ipo+sft"]:
        with pytest.raises(ValueError, match=r"policy_rejected_logps has shape \(3,\); expected \(4,\)"):
            call(name, b, ALL_HYPERS[name])


# --------------------------------------------------------------------------
# parity with TRL
# --------------------------------------------------------------------------

def trl_loss(loss_type, beta, label_smoothing, pc, pr, rc, rr, lc, lr):
    """TRL's DPOTrainer loss on given summed log-probs, through DPOTrainer._compute_loss with a
    stand-in trainer and model (no real trainer is built). The stand-in model returns per-token
    log-probs that are zero except at each response's first token, where the whole sum sits; the
    completion mask gives each response its length (one prompt token first)."""
    from trl import DPOTrainer

    if not hasattr(DPOTrainer, "_compute_loss"):
        pytest.skip("this TRL version has no DPOTrainer._compute_loss to drive")
    B = len(pc)
    T = 2 + max(max(lc), max(lr))
    completion = torch.zeros(2 * B, T, dtype=torch.long)
    for i, n in enumerate(list(lc) + list(lr)):  # rows: chosen then rejected, as TRL batches them
        completion[i, 1:1 + n] = 1
    attention = (torch.arange(T) < (completion.sum(1) + 1).unsqueeze(1)).long()
    per_token = torch.zeros(2 * B, T - 1, dtype=torch.float64)
    per_token[:, 0] = f64(list(pc) + list(pr))  # position 0 predicts the first response token
    outputs = types.SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                                    mean_logits=torch.zeros_like(per_token),
                                    is_top1=torch.zeros_like(per_token, dtype=torch.bool))
    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x,
                                          gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = dict(input_ids=torch.zeros(2 * B, T, dtype=torch.long), attention_mask=attention,
                  completion_mask=completion, ref_chosen_logps=f64(rc), ref_rejected_logps=f64(rr))
    return DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, return_outputs=False)


@pytest.mark.parametrize("name,loss_type,hp,label_smoothing", [
    ("dpo", "sigmoid", {"beta": 0.5}, 0.0),
    ("ipo", "ipo", {"beta": 0.5}, 0.0),
    ("hinge", "hinge", {"beta": 0.5}, 0.0),
    ("exo_pair", "exo_pair", {"beta": 0.5, "epsilon": 1e-3}, 1e-3),
    ("exo_pair", "exo_pair", {"beta": 0.1, "epsilon": 0.2}, 0.2),
])
def test_matches_trl(name, loss_type, hp, label_smoothing):
    trl = pytest.importorskip("trl")
    # margins h = 2, -3, -1, 12.5: with beta = 0.5 the hinge is 0 (beta h = 1), 2.5, 1.5, 0;
    # lengths differ per response, so IPO's per-sequence normalisation is exercised
    pc, pr = [-10.0, -20.0, -3.5, -30.0], [-12.0, -15.0, -4.0, -40.0]
    rc, rr = [-11.0, -18.0, -3.0, -31.0], [-11.0, -16.0, -4.5, -28.5]
    lc, lr = [5, 9, 2, 11], [6, 7, 3, 4]
    ours = call(name, batch(pc, pr, rc, rr, lc, lr), hp)
    per_example = [trl_loss(loss_type, hp["beta"], label_smoothing, [pc[i]], [pr[i]], [rc[i]], [rr[i]],
                            [lc[i]], [lr[i]]).item() for i in range(4)]
    whole = trl_loss(loss_type, hp["beta"], label_smoothing, pc, pr, rc, rr, lc, lr).item()
    print(f"\ntrl {trl.__version__} {loss_type} {hp}: ours {ours.tolist()} trl {per_example}; "
          f"batch mean ours {ours.mean().item()!r} trl {whole!r}")
    torch.testing.assert_close(ours, f64(per_example), rtol=1e-5, atol=1e-5)
    assert abs(ours.mean().item() - whole) < 1e-5


def test_preference_part_names_the_loss_without_its_sft_term():
    from rpo.losses import preference_part
    assert preference_part("rpo") == preference_part("rpo_mean") == preference_part("rpo_seqmean") == "dpo"
    assert preference_part("ipo+sft") == "ipo" and preference_part("dpo+sft") == "dpo"
    assert preference_part("hinge") == "hinge" and preference_part("dpo") == "dpo"
    with pytest.raises(ValueError, match="unknown loss 'kto'"):
        preference_part("kto")
