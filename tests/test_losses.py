"""Every loss of rpo.losses: values against plain per-element formulas across dtypes, gradcheck, the
registry and its validation (all losses), and the closed forms of the paper's losses (dpo, rpo,
rpo_mean, rpo_seqmean). The related losses' closed forms and TRL parity: tests/test_losses_related.py.

Run: pytest tests/test_losses.py -q

Expected values come from hand arithmetic (math.log / math.exp), from plain per-element formulas written
here, or from an independent solve (ternary search over tau for ada_dpo), never from the functions under
test.
"""

import math

import pytest
import torch

from helpers.losses import ALL_HYPERS, ALL_NAMES, HYPERS, batch, call, f64, random_batch, reference_loss, softplus_neg

from rpo import losses
from rpo.losses import (
    LOSSES,
    RELATED_LOSSES,
    SFT_BASES,
    TENSOR_ARGS,
    check_hyperparameters,
    dpo,
    get_loss,
    loss_hyperparameters,
    rewards,
    rpo,
    rpo_mean,
    rpo_seqmean,
)

# --------------------------------------------------------------------------
# values
# --------------------------------------------------------------------------

@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 1.0, 7.0])
def test_dpo_is_ln2_when_policy_equals_reference(beta):
    b = random_batch()
    b["reference_chosen_logps"] = b["policy_chosen_logps"].clone()
    b["reference_rejected_logps"] = b["policy_rejected_logps"].clone()
    out = dpo(**b, beta=beta)
    assert out.shape == (6,)
    torch.testing.assert_close(out, torch.full((6,), math.log(2.0), dtype=torch.float64),
                               rtol=0, atol=1e-15)


def test_dpo_and_rpo_at_hand_computed_points():
    # example 0: margin = (-10 - -11) - (-12 - -11) = 1 - (-1) = 2;  beta=0.5 -> z = 1
    #            dpo = -log sigmoid(1) = log(1 + e^-1) = 0.3132616875...
    #            rpo = dpo + eta*beta*10 = dpo + 0.2*0.5*10 = dpo + 1.0
    # example 1: margin = (-20 - -18) - (-15 - -16) = -2 - 1 = -3;  z = -1.5
    #            dpo = log(1 + e^1.5) = 1.7014132779...
    #            rpo = dpo + 0.1*20 = dpo + 2.0
    # example 2: margin = (-3 - -3) - (-4 - -4) = 0;  z = 0;  dpo = log 2;  rpo = log 2 + 0.3
    b = batch(pc=[-10.0, -20.0, -3.0], pr=[-12.0, -15.0, -4.0],
              rc=[-11.0, -18.0, -3.0], rr=[-11.0, -16.0, -4.0],
              lc=[5, 9, 2], lr=[6, 7, 3])
    exp_dpo = [math.log(1.0 + math.exp(-1.0)), math.log(1.0 + math.exp(1.5)), math.log(2.0)]
    exp_rpo = [exp_dpo[0] + 1.0, exp_dpo[1] + 2.0, exp_dpo[2] + 0.3]
    torch.testing.assert_close(dpo(**b, beta=0.5), torch.tensor(exp_dpo, dtype=torch.float64),
                               rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(rpo(**b, beta=0.5, eta=0.2), torch.tensor(exp_rpo, dtype=torch.float64),
                               rtol=1e-13, atol=1e-13)
    assert abs(exp_dpo[0] - 0.3132616875182228) < 1e-15


def test_zero_weight_gives_dpo_exactly():
    b = random_batch(seed=3)
    ref = dpo(**b, beta=0.3)
    assert torch.equal(rpo(**b, beta=0.3, eta=0.0), ref)
    assert torch.equal(rpo_mean(**b, beta=0.3, alpha=0.0), ref)
    assert torch.equal(rpo_seqmean(**b, beta=0.3, alpha=0.0), ref)


def test_rpo_mean_batch_mean_matches_trl_token_mean():
    # chosen NLLs 10, 20, 6 over 5 + 9 + 2 = 16 chosen tokens: token-mean 36/16 = 2.25;
    # batch mean = mean(dpo) + alpha * 2.25, per-example sft = alpha * nll_i * 3 / 16.
    b = batch(pc=[-10.0, -20.0, -6.0], pr=[-12.0, -15.0, -4.0],
              rc=[-11.0, -18.0, -3.0], rr=[-11.0, -16.0, -4.0],
              lc=[5, 9, 2], lr=[6, 7, 3])
    beta, alpha = 0.5, 0.2
    d = [softplus_neg(beta * ((pc - rc) - (pr - rr))) for pc, pr, rc, rr in
         zip([-10.0, -20.0, -6.0], [-12.0, -15.0, -4.0], [-11.0, -18.0, -3.0], [-11.0, -16.0, -4.0])]
    out = rpo_mean(**b, beta=beta, alpha=alpha)
    expected_mean = sum(d) / 3 + alpha * (10.0 + 20.0 + 6.0) / (5 + 9 + 2)
    assert abs(out.mean().item() - expected_mean) < 1e-13
    expected = [d[i] + alpha * nll * 3 / 16 for i, nll in enumerate([10.0, 20.0, 6.0])]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), rtol=1e-13, atol=1e-13)
    # float lengths give the same result as int lengths
    b["chosen_lengths"] = b["chosen_lengths"].double()
    torch.testing.assert_close(rpo_mean(**b, beta=beta, alpha=alpha), out, rtol=0, atol=0)


def test_rpo_mean_sft_term_depends_on_batch():
    # The documented caveat: splitting the batch changes per-example values
    # (different token totals), so only the micro-batch mean is meaningful.
    b = random_batch(n=4, seed=5)
    whole = rpo_mean(**b, beta=0.5, alpha=0.2)
    half = rpo_mean(**{k: v[:2] for k, v in b.items()}, beta=0.5, alpha=0.2)
    assert not torch.allclose(whole[:2], half)


def test_rpo_seqmean_closed_form():
    # example 0: dpo(z=1) + 0.2 * 10/5 = log(1+e^-1) + 0.4
    # example 1: dpo(z=-1.5) + 0.2 * 20/8 = log(1+e^1.5) + 0.5
    b = batch(pc=[-10.0, -20.0], pr=[-12.0, -15.0], rc=[-11.0, -18.0], rr=[-11.0, -16.0],
              lc=[5, 8], lr=[6, 7])
    expected = [math.log(1.0 + math.exp(-1.0)) + 0.4, math.log(1.0 + math.exp(1.5)) + 0.5]
    torch.testing.assert_close(rpo_seqmean(**b, beta=0.5, alpha=0.2),
                               torch.tensor(expected, dtype=torch.float64), rtol=1e-13, atol=1e-13)


def test_large_margins_are_stable():
    # beta * margin = -/+ 1000: log(sigmoid) computed naively gives inf / exactly 0.
    b = batch(pc=[-1000.0, 0.0], pr=[0.0, -1000.0], rc=[0.0, 0.0], rr=[0.0, 0.0],
              lc=[1, 1], lr=[1, 1], dtype=torch.float32)
    out = dpo(**b, beta=1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([1000.0, 0.0]), rtol=1e-6, atol=1e-30)


# --------------------------------------------------------------------------
# every loss: a plain reference across dtypes, gradcheck
# --------------------------------------------------------------------------

# (rtol, atol) per dtype: float64/float32 are near their epsilon; bfloat16 keeps 8 mantissa bits, so
# the ~30-nat sums lose ~0.1 nat to rounding, which IPO then squares (values up to ~(5 + 0.3)^2 here).
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (3e-2, 6e-2),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_matches_reference_across_dtypes(name, dtype):
    b = random_batch(n=16, seed=11, dtype=dtype)
    hp = ALL_HYPERS[name]
    out = call(name, b, hp)
    assert out.dtype == dtype and out.shape == (16,)
    # the reference sees the same (rounded) inputs, so only the arithmetic is compared
    expected = f64(reference_loss(name, b, hp))
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_gradcheck_float64(name):
    b = random_batch(n=4, seed=13)
    if name.startswith("ada_dpo"):
        # z = beta h = 0.05, 3, -4, 20: tau* at tau0, inside, inside, at tau_max
        b = batch(pc=[0.1 - 20.0, 6.0 - 20.0, -8.0 - 20.0, 40.0 - 20.0], pr=[-9.0] * 4,
                  rc=[-20.0] * 4, rr=[-9.0] * 4, lc=[3, 4, 5, 6], lr=[2, 3, 4, 5])
    lens = {k: b[k] for k in TENSOR_ARGS[4:]}
    inputs = tuple(b[k].clone().requires_grad_(True) for k in TENSOR_ARGS[:4])
    fn = get_loss(name)

    def f(pc, pr, rc, rr):
        return fn(policy_chosen_logps=pc, policy_rejected_logps=pr, reference_chosen_logps=rc,
                  reference_rejected_logps=rr, **lens, **ALL_HYPERS[name])

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)



# --------------------------------------------------------------------------
# gradients
# --------------------------------------------------------------------------

def test_rpo_gradient_on_leaf_logps():
    beta, eta = 0.4, 0.7
    b = random_batch(seed=7)
    leaves = {k: b[k].clone().requires_grad_(True) for k in TENSOR_ARGS[:4]}
    lens = {k: b[k] for k in TENSOR_ARGS[4:]}
    g_rpo = torch.autograd.grad(rpo(**leaves, **lens, beta=beta, eta=eta).sum(), list(leaves.values()))
    g_dpo = torch.autograd.grad(dpo(**leaves, **lens, beta=beta).sum(), list(leaves.values()))
    # d/d pc: extra -eta*beta per example; the other three gradients are DPO's.
    torch.testing.assert_close(g_rpo[0], g_dpo[0] - eta * beta, rtol=1e-12, atol=1e-12)
    for gr, gd in zip(g_rpo[1:], g_dpo[1:]):
        torch.testing.assert_close(gr, gd, rtol=0, atol=0)


def summed_logps(model, feats, tokens, lengths):
    """Sum over the first `lengths[i]` positions of log softmax(model(feats))[token]."""
    logp = torch.log_softmax(model(feats), dim=-1)                     # [B, T, V]
    tok = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)            # [B, T]
    mask = torch.arange(tokens.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    return (tok * mask).sum(-1)


def test_rpo_parameter_gradient_is_dpo_plus_eta_beta_sft():
    torch.manual_seed(0)
    B, T, D, V = 4, 6, 5, 11
    beta, eta = 0.5, 0.3
    policy = torch.nn.Linear(D, V).double()
    reference = torch.nn.Linear(D, V).double().requires_grad_(False)
    feats_c, feats_r = torch.randn(B, T, D, dtype=torch.float64), torch.randn(B, T, D, dtype=torch.float64)
    tok_c, tok_r = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    len_c, len_r = torch.tensor([6, 3, 4, 1]), torch.tensor([2, 6, 5, 3])

    def grads(objective):
        pc = summed_logps(policy, feats_c, tok_c, len_c)
        pr = summed_logps(policy, feats_r, tok_r, len_r)
        with torch.no_grad():
            rc = summed_logps(reference, feats_c, tok_c, len_c)
            rr = summed_logps(reference, feats_r, tok_r, len_r)
        kw = dict(policy_chosen_logps=pc, policy_rejected_logps=pr, reference_chosen_logps=rc,
                  reference_rejected_logps=rr, chosen_lengths=len_c, rejected_lengths=len_r)
        return torch.autograd.grad(objective(kw, pc), list(policy.parameters()))

    g_rpo = grads(lambda kw, pc: rpo(**kw, beta=beta, eta=eta).mean())
    g_dpo = grads(lambda kw, pc: dpo(**kw, beta=beta).mean())
    g_sft = grads(lambda kw, pc: (-pc).mean())       # summed NLL of the chosen response
    assert any(g.abs().max() > 1e-3 for g in g_sft)  # the SFT term actually moves the model
    for gr, gd, gs in zip(g_rpo, g_dpo, g_sft):
        torch.testing.assert_close(gr, gd + eta * beta * gs, rtol=1e-10, atol=1e-12)


def test_rewards_value_and_detached():
    p = torch.tensor([-3.0, -5.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-4.0, -4.5], dtype=torch.float64)
    out = rewards(p, r, 0.5)
    assert not out.requires_grad
    torch.testing.assert_close(out, torch.tensor([0.5, -0.25], dtype=torch.float64), rtol=0, atol=1e-15)


# --------------------------------------------------------------------------
# registry and validation
# --------------------------------------------------------------------------

def test_registry_names_and_hyperparameters():
    assert list(LOSSES) == ["dpo", "rpo", "rpo_mean", "rpo_seqmean"]  # the paper's losses
    assert list(RELATED_LOSSES) == ["ipo", "exo_pair", "hinge", "minor_dpo", "ada_dpo"]
    assert SFT_BASES == ("dpo", "ipo", "exo_pair", "hinge", "minor_dpo", "ada_dpo")
    assert get_loss("rpo") is rpo
    assert loss_hyperparameters("dpo") == ("beta",)
    assert loss_hyperparameters("rpo") == ("beta", "eta")
    assert loss_hyperparameters("rpo_mean") == ("beta", "alpha")
    assert loss_hyperparameters("rpo_seqmean") == ("beta", "alpha")
    assert loss_hyperparameters("ipo") == ("beta",)
    assert loss_hyperparameters("exo_pair") == ("beta", "epsilon")
    assert loss_hyperparameters("hinge") == ("beta",)
    assert loss_hyperparameters("minor_dpo") == ("beta",)
    assert loss_hyperparameters("ada_dpo") == ("beta", "tau0", "tau_max", "rho")
    assert loss_hyperparameters("dpo+sft") == ("beta", "eta")
    assert loss_hyperparameters("ada_dpo+sft") == ("beta", "tau0", "tau_max", "rho", "eta")
    # every loss takes beta (the trainer logs beta * log-ratio rewards with it)
    for name in ALL_NAMES:
        assert loss_hyperparameters(name)[0] == "beta", name
    assert get_loss("ipo+sft") is get_loss("ipo+sft")  # built once
    assert get_loss("ipo+sft").__name__ == "ipo_sft"


def test_unknown_names_list_valid_names_and_sft_suffix():
    with pytest.raises(ValueError) as e:
        get_loss("xyz")
    msg = str(e.value)
    assert msg.startswith("unknown loss 'xyz'; expected one of: dpo, rpo, rpo_mean, rpo_seqmean, "
                          "ipo, exo_pair, hinge, minor_dpo, ada_dpo;")
    assert "'+sft'" in msg and "dpo, ipo, exo_pair, hinge, minor_dpo, ada_dpo" in msg
    for bad in ("ipo+sft+sft", "+sft", "IPO", "ipo+SFT"):
        with pytest.raises(ValueError, match=r"^unknown loss"):
            get_loss(bad)
    # the rpo variants already carry an SFT term
    with pytest.raises(ValueError, match=r"'rpo' already has an SFT term; '\+sft' extends one of: dpo, ipo"):
        get_loss("rpo+sft")
    with pytest.raises(ValueError, match=r"^config methods.x: unknown loss 'rpo_mean\+sft'"):
        check_hyperparameters("rpo_mean+sft", {}, "config methods.x")


def test_check_hyperparameters():
    check_hyperparameters("rpo", {"beta": 0.1, "eta": 1.0}, "config methods.rpo")  # no error
    with pytest.raises(ValueError) as e:
        check_hyperparameters("rpo", {"beta": 0.1}, "config methods.rpo")
    msg = str(e.value)
    assert msg.startswith("config methods.rpo:") and "missing hyperparameter(s): eta" in msg
    with pytest.raises(ValueError) as e:
        check_hyperparameters("dpo", {"beta": 0.1, "alpha": 0.2, "eta": 1}, "config methods.dpo")
    msg = str(e.value)
    assert msg.startswith("config methods.dpo:") and "unexpected hyperparameter(s): alpha, eta" in msg
    assert "missing" not in msg
    with pytest.raises(ValueError, match=r"^config methods.x: unknown loss 'nope'"):
        check_hyperparameters("nope", {}, "config methods.x")
    with pytest.raises(ValueError, match=r"^config methods.rpo: beta must be > 0, got 0"):
        check_hyperparameters("rpo", {"beta": 0, "eta": 1.0}, "config methods.rpo")
    check_hyperparameters("ipo+sft", {"beta": 0.1, "eta": 0.005}, "config methods.ipo_sft")  # no error
    check_hyperparameters("ada_dpo", HYPERS["ada_dpo"], "config methods.ada")
    check_hyperparameters("ada_dpo", {**HYPERS["ada_dpo"], "tau0": 1.0, "tau_max": 1.0}, "m")  # empty-width ok
    with pytest.raises(ValueError) as e:
        check_hyperparameters("exo_pair+sft", {"beta": 0.1, "epsilon": 1e-3}, "config methods.exo")
    assert str(e.value).startswith("config methods.exo: loss 'exo_pair+sft' missing hyperparameter(s): eta")
    with pytest.raises(ValueError, match=r"^config methods.exo: epsilon must be in \(0, 1\), got 0"):
        check_hyperparameters("exo_pair", {"beta": 0.1, "epsilon": 0}, "config methods.exo")
    with pytest.raises(ValueError, match=r"^config methods.ada: tau_max must be >= tau0, "
                                         r"got tau_max=0.5 < tau0=1.0"):
        check_hyperparameters("ada_dpo", {"beta": 0.1, "tau0": 1.0, "tau_max": 0.5, "rho": 0.2},
                              "config methods.ada")
    with pytest.raises(ValueError, match=r"^config methods.h: loss 'hinge' unexpected hyperparameter\(s\): gamma"):
        check_hyperparameters("hinge", {"beta": 0.1, "gamma": 0.1}, "config methods.h")


@pytest.mark.parametrize("name,hp,match", [
    ("dpo", {"beta": 0.0}, r"beta must be > 0, got 0.0"),
    ("dpo", {"beta": -0.1}, r"beta must be > 0, got -0.1"),
    ("dpo", {"beta": float("nan")}, r"beta must be finite"),
    ("rpo", {"beta": 0.1, "eta": -1.0}, r"eta must be >= 0, got -1.0"),
    ("rpo_mean", {"beta": 0.1, "alpha": -0.5}, r"alpha must be >= 0, got -0.5"),
    ("rpo_seqmean", {"beta": 0.1, "alpha": "0.2"}, r"alpha must be a real number"),
    ("ipo", {"beta": 0.0}, r"beta must be > 0, got 0.0"),
    ("hinge", {"beta": -1.0}, r"beta must be > 0, got -1.0"),
    ("minor_dpo", {"beta": float("inf")}, r"beta must be finite"),
    ("exo_pair", {"beta": 0.1, "epsilon": 0.0}, r"epsilon must be in \(0, 1\), got 0.0: .*requires epsilon > 0"),
    ("exo_pair", {"beta": 0.1, "epsilon": -1e-3}, r"epsilon must be in \(0, 1\), got -0.001"),
    ("exo_pair", {"beta": 0.1, "epsilon": 1.0}, r"epsilon must be in \(0, 1\), got 1.0"),
    ("exo_pair", {"beta": 0.1, "epsilon": "1e-3"}, r"epsilon must be a real number"),
    ("ada_dpo", {"beta": 0.1, "tau0": 0.0, "tau_max": 5.0, "rho": 0.2}, r"tau0 must be > 0, got 0.0"),
    ("ada_dpo", {"beta": 0.1, "tau0": 0.1, "tau_max": -5.0, "rho": 0.2}, r"tau_max must be > 0, got -5.0"),
    ("ada_dpo", {"beta": 0.1, "tau0": 2.0, "tau_max": 1.0, "rho": 0.2},
     r"tau_max must be >= tau0, got tau_max=1.0 < tau0=2.0"),
    ("ada_dpo", {"beta": 0.1, "tau0": 0.1, "tau_max": 5.0, "rho": -0.1}, r"rho must be >= 0 \(a KL radius\), got -0.1"),
    ("ipo+sft", {"beta": 0.1, "eta": -1.0}, r"eta must be >= 0, got -1.0"),
    ("ada_dpo+sft", {"beta": 0.1, "tau0": 0.0, "tau_max": 5.0, "rho": 0.2, "eta": 1.0}, r"tau0 must be > 0"),
])
def test_invalid_hyperparameters(name, hp, match):
    with pytest.raises(ValueError, match=match):
        call(name, random_batch(n=2), hp)


def test_shape_errors():
    b = random_batch(n=4)
    b["reference_rejected_logps"] = b["reference_rejected_logps"][:3]
    with pytest.raises(ValueError, match=r"reference_rejected_logps has shape \(3,\); expected \(4,\)"):
        dpo(**b, beta=0.1)
    b = random_batch(n=4)
    b["chosen_lengths"] = b["chosen_lengths"].reshape(2, 2)
    with pytest.raises(ValueError, match=r"chosen_lengths must be 1-D with shape \[B\], got shape \(2, 2\)"):
        rpo(**b, beta=0.1, eta=1.0)


def test_lengths_and_dtype_errors():
    b = random_batch(n=3)
    b["chosen_lengths"] = torch.tensor([4, 0, 2])
    for fn in (rpo_mean, rpo_seqmean):
        with pytest.raises(ValueError, match=r"chosen_lengths must be > 0 for every example"):
            fn(**b, beta=0.1, alpha=0.2)
    dpo(**b, beta=0.1)  # DPO does not use the lengths
    b = random_batch(n=3)
    b["reference_chosen_logps"] = b["reference_chosen_logps"].float()
    with pytest.raises(ValueError, match=r"reference_chosen_logps has dtype torch.float32; expected torch.float64"):
        dpo(**b, beta=0.1)


def test_losses_are_keyword_only():
    b = random_batch(n=2)
    with pytest.raises(TypeError):
        losses.dpo(*[b[k] for k in TENSOR_ARGS], 0.1)
