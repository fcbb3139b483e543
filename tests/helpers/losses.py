"""The losses' test material (tests/test_losses.py, tests/test_losses_related.py): each loss's hyperparameters,
batches from lists or random, and the plain per-element formulas in Python floats the losses are checked
against (never the functions under test)."""
from __future__ import annotations

import math

import torch

from rpo.losses import LOSSES, RELATED_LOSSES, SFT_BASES, TENSOR_ARGS, get_loss

HYPERS = {
    "dpo": {"beta": 0.1},
    "rpo": {"beta": 0.1, "eta": 0.5},
    "rpo_mean": {"beta": 0.5, "alpha": 0.2},
    "rpo_seqmean": {"beta": 0.5, "alpha": 0.2},
    "ipo": {"beta": 0.1},
    "exo_pair": {"beta": 0.1, "epsilon": 1e-3},
    "hinge": {"beta": 0.1},
    "minor_dpo": {"beta": 0.1},
    # the authors' DPO defaults for tau0, tau_max, rho; beta = 0.5 puts some pairs of
    # random_batch inside (tau0, tau_max) and some at each bound
    "ada_dpo": {"beta": 0.5, "tau0": 0.1, "tau_max": 5.0, "rho": 0.2},
}
SFT_NAMES = [f"{base}+sft" for base in SFT_BASES]
SFT_HYPERS = {f"{base}+sft": {**HYPERS[base], "eta": 0.3} for base in SFT_BASES}
ALL_HYPERS = {**HYPERS, **SFT_HYPERS}
ALL_NAMES = [*LOSSES, *RELATED_LOSSES, *SFT_NAMES]
LOG2 = math.log(2.0)


def batch(pc, pr, rc, rr, lc=None, lr=None, dtype=torch.float64):
    """The six keyword arguments from Python lists (lengths default to 1)."""
    t = lambda xs: torch.tensor(xs, dtype=dtype)
    return dict(
        policy_chosen_logps=t(pc),
        policy_rejected_logps=t(pr),
        reference_chosen_logps=t(rc),
        reference_rejected_logps=t(rr),
        chosen_lengths=torch.tensor(lc if lc is not None else [1] * len(pc)),
        rejected_lengths=torch.tensor(lr if lr is not None else [1] * len(pc)),
    )


def random_batch(n=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = lambda: (-40.0 + 35.0 * torch.rand(n, generator=g, dtype=torch.float64)).to(dtype)
    return dict(
        policy_chosen_logps=logp(),
        policy_rejected_logps=logp(),
        reference_chosen_logps=logp(),
        reference_rejected_logps=logp(),
        chosen_lengths=torch.randint(3, 300, (n,), generator=g),
        rejected_lengths=torch.randint(3, 300, (n,), generator=g),
    )


def softplus_neg(z):
    """-log sigmoid(z) = log(1 + exp(-z)), evaluated without overflow."""
    return math.log1p(math.exp(-z)) if z >= 0 else -z + math.log1p(math.exp(z))


def log_sigmoid(x):
    """log sigmoid(x) in Python floats, without overflow."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def ada_objective(z, tau, rho):
    """Hong et al. eq. 4 / 6 with the DPO reward z = beta * h."""
    return -tau * log_sigmoid(z / tau) + (rho - LOG2) * tau


def ada_reference(z, tau0, tau_max, rho):
    """min over [tau0, tau_max] of ada_objective by ternary search (the objective is convex in tau)."""
    lo, hi = tau0, tau_max
    for _ in range(200):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if ada_objective(z, a, rho) <= ada_objective(z, b, rho):
            hi = b
        else:
            lo = a
    return min(ada_objective(z, t, rho) for t in (tau0, 0.5 * (lo + hi), tau_max))


def reference_loss(name, b, hp):
    """Per-element formulas in Python floats (float64), for every registered loss."""
    pc, pr, rc, rr = (b[k].double().tolist() for k in TENSOR_ARGS[:4])
    lc, lr = (b[k].double().tolist() for k in TENSOR_ARGS[4:])
    n, beta = len(pc), hp["beta"]
    if name.endswith("+sft"):  # the base plus rpo's term eta * beta * (-pc)
        base = reference_loss(name[:-4], b, {k: v for k, v in hp.items() if k != "eta"})
        return [base[i] + hp["eta"] * beta * (-pc[i]) for i in range(n)]
    d = [softplus_neg(beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))) for i in range(n)]
    if name == "dpo":
        return d
    if name == "rpo":
        return [d[i] + hp["eta"] * beta * (-pc[i]) for i in range(n)]
    if name == "rpo_mean":
        # batch mean of these = mean(d) + alpha * sum(-pc) / sum(lc)
        return [d[i] + hp["alpha"] * (-pc[i]) * n / sum(lc) for i in range(n)]
    if name == "rpo_seqmean":
        return [d[i] + hp["alpha"] * (-pc[i] / lc[i]) for i in range(n)]
    out = []
    for i in range(n):
        dw, dl = pc[i] - rc[i], pr[i] - rr[i]
        if name == "ipo":
            out.append((dw / lc[i] - dl / lr[i] - 1 / (2 * beta)) ** 2)
        elif name == "exo_pair":
            z, eps = beta * (dw - dl), hp["epsilon"]
            lqc, lqr = log_sigmoid(z), log_sigmoid(-z)
            out.append(math.exp(lqc) * (lqc - math.log(1 - eps)) + math.exp(lqr) * (lqr - math.log(eps)))
        elif name == "hinge":
            out.append(max(0.0, 1 - beta * (dw - dl)))
        elif name == "minor_dpo":
            out.append(-log_sigmoid(beta * (dw - max(0.0, dl))))
        elif name == "ada_dpo":
            out.append(ada_reference(beta * (dw - dl), hp["tau0"], hp["tau_max"], hp["rho"]))
        else:
            raise AssertionError(name)
    return out


def call(name, b, hp):
    return get_loss(name)(**b, **hp)


def grads(name, b, hp):
    """d(sum of the loss)/d(each of the four log-prob tensors)."""
    leaves = {k: b[k].clone().requires_grad_(True) for k in TENSOR_ARGS[:4]}
    lens = {k: b[k] for k in TENSOR_ARGS[4:]}
    return torch.autograd.grad(get_loss(name)(**leaves, **lens, **hp).sum(), list(leaves.values()))


def f64(xs):
    return torch.tensor(xs, dtype=torch.float64)
