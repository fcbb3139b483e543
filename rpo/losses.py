"""Preference-optimisation losses: DPO and the RPO variants.

RPO (Liu et al., "Provably Mitigating Overoptimization in RLHF", NeurIPS 2024)
adds an SFT term on the chosen response to the DPO loss. Paper eq. 4.8 (the
default RPO, up to the 1/n average over the data set, which the trainer does):

    L_RPO = eta * beta * (-log pi(y_chosen | x)) + L_DPO

with L_DPO = -log sigmoid(beta * [(log pi(y_c) - log ref(y_c))
                                  - (log pi(y_r) - log ref(y_r))]).

Every loss here is a pure function of six per-example tensors of shape [B]:

    policy_chosen_logps, policy_rejected_logps,
    reference_chosen_logps, reference_rejected_logps
        log-probabilities of each response SUMMED over its tokens;
    chosen_lengths, rejected_lengths
        the response token counts (int or float).

All are keyword-only, followed by the loss's hyperparameters (keyword-only
too), and each loss returns the per-example loss of shape [B]; the trainer
takes the mean. Arithmetic stays in the dtype of the log-probabilities; the
sigmoid goes through torch.nn.functional.logsigmoid, which is stable for
large |margin| where log(sigmoid(x)) would underflow to log(0).

Variants (see each function):
  dpo          the DPO loss alone;
  rpo          paper eq. 4.8 with the summed chosen NLL (authors' trainer);
  rpo_mean     TRL's loss_type=["sigmoid", "sft"], token-mean NLL per micro-batch;
  rpo_seqmean  the authors' Appendix-F (OpenRLHF) variant, NLL / length per sequence.

Related methods (the paper's "related methods" zoo, RELATED_LOSSES), with
h = (pc - rc) - (pr - rr) the log-ratio margin:
  ipo          (h_norm - 1/(2 beta))^2, h_norm from per-token log-ratios (TRL "ipo");
  exo_pair     KL(softmax(beta [pc - rc, pr - rr]) || (1 - epsilon, epsilon)) (TRL "exo_pair");
  hinge        max(0, 1 - beta h), RSO's hinge-norm with gamma = beta (TRL "hinge");
  minor_dpo    -log sigmoid(beta ((pc - rc) - max(0, pr - rr)));
  ada_dpo      min over tau in [tau0, tau_max] of -tau log sigmoid(beta h / tau) + (rho - log 2) tau.

Any loss without an SFT term (dpo and the related ones) also exists as
"<name>+sft", which adds rpo's term eta * beta * (-pc); "dpo+sft" is rpo.

The registry (LOSSES, RELATED_LOSSES, get_loss, loss_hyperparameters,
check_hyperparameters) lets a config validator check a method's
hyperparameters before training.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F

# The six per-example tensor arguments every loss takes, in this order.
TENSOR_ARGS: tuple[str, ...] = (
    "policy_chosen_logps",
    "policy_rejected_logps",
    "reference_chosen_logps",
    "reference_rejected_logps",
    "chosen_lengths",
    "rejected_lengths",
)
_LOGP_ARGS = TENSOR_ARGS[:4]


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------

def _check_hyperparameter(name: str, value) -> None:
    """Raise ValueError unless `value` is a legal setting of hyperparameter `name`.

    beta scales the implicit reward and divides the KL penalty, so it must be
    strictly positive; eta and alpha weight the SFT term and may be 0 (which
    gives back DPO) but not negative (that would reward forgetting y_chosen).
    EXO's epsilon is a label probability whose log is taken, so 0 < epsilon < 1.
    Ada-DPO's tau0 and tau_max bound a scale (> 0; tau_max >= tau0 is checked
    by _check_tau_bounds) and rho is a KL radius (>= 0).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if name == "beta" and not value > 0:
        raise ValueError(f"beta must be > 0, got {value!r}")
    if name in ("eta", "alpha") and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    if name == "epsilon" and not 0 < value < 1:
        raise ValueError(
            f"epsilon must be in (0, 1), got {value!r}: EXO's target distribution is "
            "(1 - epsilon, epsilon) and the loss takes log(epsilon), so the paper requires "
            "epsilon > 0 (it recommends 1e-3)"
        )
    if name in ("tau0", "tau_max") and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if name == "rho" and not value >= 0:
        raise ValueError(f"rho must be >= 0 (a KL radius), got {value!r}")


def _check_tau_bounds(tau0: float, tau_max: float) -> None:
    """Ada-DPO's interval [tau0, tau_max] must not be empty."""
    if not tau_max >= tau0:
        raise ValueError(f"tau_max must be >= tau0, got tau_max={tau_max!r} < tau0={tau0!r}")


def _check_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """Check the six inputs: tensors, 1-D, one shape [B] with B >= 1, and
    floating log-probabilities of a single dtype (so "compute in the input
    dtype" has one meaning)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape [B], got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D with shape [B], got shape {tuple(t.shape)}")
    shape = tensors["policy_chosen_logps"].shape
    for name, t in tensors.items():
        if t.shape != shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; expected {tuple(shape)}, "
                "the shape of policy_chosen_logps (all six inputs must share shape [B])"
            )
    if shape[0] == 0:
        raise ValueError("policy_chosen_logps has batch size 0; expected a batch of B >= 1 examples")
    dtype = tensors["policy_chosen_logps"].dtype
    for name in _LOGP_ARGS:
        t = tensors[name]
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dtype != dtype:
            raise ValueError(
                f"{name} has dtype {t.dtype}; expected {dtype}, the dtype of policy_chosen_logps"
            )


def _check_lengths_positive(name: str, lengths: torch.Tensor) -> None:
    # `not (x > 0).all()` also rejects NaN lengths.
    if not bool((lengths > 0).all()):
        raise ValueError(f"{name} must be > 0 for every example, got {lengths.tolist()}")


def _reciprocal(lengths: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1 / lengths in `dtype`, rounded once: taking the reciprocal in float64
    first avoids rounding a long length to bfloat16 (8-bit mantissa) and then
    rounding the quotient again."""
    return (1.0 / lengths.to(torch.float64)).to(dtype)


# --------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------

def _dpo(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float) -> torch.Tensor:
    # -log sigmoid(beta * margin), margin = log-ratio(chosen) - log-ratio(rejected)
    # (Rafailov et al. 2023, eq. 7); logsigmoid is computed stably.
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def dpo(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-example DPO loss -log sigmoid(beta * ((pc - rc) - (pr - rr))), shape [B].

    The lengths are accepted (and shape-checked) for a uniform signature but unused.
    """
    _check_hyperparameter("beta", beta)
    _check_tensors(dict(zip(TENSOR_ARGS, (
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, chosen_lengths, rejected_lengths))))
    return _dpo(policy_chosen_logps, policy_rejected_logps,
                reference_chosen_logps, reference_rejected_logps, beta)


def rpo(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    eta: float,
) -> torch.Tensor:
    """Per-example default RPO loss (paper eq. 4.8), shape [B]:

        eta * beta * (-policy_chosen_logps) + dpo

    The SFT term is the SUMMED negative log-likelihood of the chosen response,
    as in the authors' trainer (which subtracts policy_chosen_logps * beta * eta
    from the per-example DPO loss), not a per-token mean. eta = 0 gives DPO.
    """
    _check_hyperparameter("beta", beta)
    _check_hyperparameter("eta", eta)
    _check_tensors(dict(zip(TENSOR_ARGS, (
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, chosen_lengths, rejected_lengths))))
    dpo_loss = _dpo(policy_chosen_logps, policy_rejected_logps,
                    reference_chosen_logps, reference_rejected_logps, beta)
    return dpo_loss + (eta * beta) * (-policy_chosen_logps)


def rpo_mean(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    alpha: float,
) -> torch.Tensor:
    """Per-example loss matching current TRL's loss_type=["sigmoid", "sft"] with
    loss_weights=[1, alpha], shape [B].

    TRL's "sft" term is the token-mean NLL over ALL chosen tokens of the
    micro-batch, sum_i(-pc_i) / sum_i(len_i). To return per-example values
    whose batch MEAN equals  mean(dpo) + alpha * sum_i(-pc_i) / sum_i(len_i),
    example i carries  dpo_i + alpha * (-pc_i) * B / sum_j(len_j).

    NOTE: the SFT part of each example therefore depends on the whole batch
    (through sum_j len_j and B): only the batch mean, as the trainer takes it,
    is meaningful, and it matches TRL exactly for that micro-batch. Gradient
    accumulation over micro-batches averages micro-batch token-means, as TRL
    does, not one token-mean over the accumulated batch.
    """
    _check_hyperparameter("beta", beta)
    _check_hyperparameter("alpha", alpha)
    _check_tensors(dict(zip(TENSOR_ARGS, (
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, chosen_lengths, rejected_lengths))))
    _check_lengths_positive("chosen_lengths", chosen_lengths)
    dpo_loss = _dpo(policy_chosen_logps, policy_rejected_logps,
                    reference_chosen_logps, reference_rejected_logps, beta)
    batch = policy_chosen_logps.shape[0]
    # B / total chosen tokens, formed in float64 so a large token count is
    # not rounded (e.g. to bfloat16) before the division.
    total_tokens = chosen_lengths.to(torch.float64).sum()
    scale = (batch / total_tokens).to(policy_chosen_logps.dtype)
    return dpo_loss + alpha * (-policy_chosen_logps) * scale


def rpo_seqmean(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    alpha: float,
) -> torch.Tensor:
    """Per-example loss of the authors' Appendix-F (OpenRLHF) variant, shape [B]:

        dpo + alpha * (-policy_chosen_logps / chosen_lengths)

    i.e. the chosen NLL length-normalised per sequence with a plain weight
    alpha (no beta factor); the paper's runs used alpha = 0.2 with beta = 0.5.
    """
    _check_hyperparameter("beta", beta)
    _check_hyperparameter("alpha", alpha)
    _check_tensors(dict(zip(TENSOR_ARGS, (
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, chosen_lengths, rejected_lengths))))
    _check_lengths_positive("chosen_lengths", chosen_lengths)
    dpo_loss = _dpo(policy_chosen_logps, policy_rejected_logps,
                    reference_chosen_logps, reference_rejected_logps, beta)
    inv_len = _reciprocal(chosen_lengths, policy_chosen_logps.dtype)
    return dpo_loss + alpha * (-policy_chosen_logps) * inv_len


# --------------------------------------------------------------------------
# related methods (paper.md, "Related methods"): same inputs, other objectives
# --------------------------------------------------------------------------

def _margin(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
    # h = log-ratio(chosen) - log-ratio(rejected), the quantity DPO scales by beta
    return (pc - rc) - (pr - rr)


def ipo(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-example IPO loss (Azar et al. 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences", eq. 17), shape [B]:

        (h_norm - 1 / (2 beta))^2,
        h_norm = (pc - rc) / chosen_lengths - (pr - rr) / rejected_lengths

    beta is the paper's tau (the weight of the KL term). The loss is minimised,
    with zero gradient, at h_norm = 1 / (2 beta).

    Length normalisation follows TRL's loss_type="ipo": eq. 17 is written with
    sequence log-probabilities, but TRL divides each sequence's summed log-ratio
    by that sequence's own number of completion tokens (a per-token average
    within the sequence, not over the batch), so the squared loss does not grow
    with response length; TRL reports that the IPO authors confirmed this form.
    TRL clamps lengths to >= 1; here a length <= 0 is an error.
    """
    _check_hyperparameter("beta", beta)
    _check_tensors(dict(zip(TENSOR_ARGS, (
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, chosen_lengths, rejected_lengths))))
    _check_lengths_positive("chosen_lengths", chosen_lengths)
    _check_lengths_positive("rejected_lengths", rejected_lengths)
    dtype = policy_chosen_logps.dtype
    h_norm = ((policy_chosen_logps - reference_chosen_logps) * _reciprocal(chosen_lengths, dtype)
              - (policy_rejected_logps - reference_rejected_logps) * _reciprocal(rejected_lengths, dtype))
    return (h_norm - 1.0 / (2.0 * beta)) ** 2


def exo_pair(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    epsilon: float,
) -> torch.Tensor:
    """Per-example pairwise EXO loss (Ji et al. 2024, "Towards Efficient Exact
    Optimization of Language Model Alignment", arXiv 2402.00856; EXO on
    preference data with K = 2 responses, eq. 16 as TRL cites it), shape [B]:

        KL(q || p) = q_c (log q_c - log(1 - epsilon)) + q_r (log q_r - log epsilon),
        q = softmax(beta * [pc - rc, pr - rr]) = (sigmoid(beta h), sigmoid(-beta h)),

    the reverse KL from the policy's implicit preference distribution q over
    {chosen, rejected} to the label distribution p = (1 - epsilon, epsilon).
    Equal to TRL's loss_type="exo_pair" with label_smoothing = epsilon (TRL
    rejects 0 and suggests 1e-3). The minimum is at beta h = log((1 - epsilon) /
    epsilon); below it the gradient is DPO's times the positive factor
    sigmoid(beta h) * (log((1 - epsilon) / epsilon) - beta h), so as epsilon -> 0
    EXO moves the policy in DPO's direction, as the EXO paper states.
    """
    _check_hyperparameter("beta", beta)
    _check_hyperparameter("epsilon", epsilon)
    _check_tensors(dict(zip(TENSOR_ARGS, (
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, chosen_lengths, rejected_lengths))))
    z = beta * _margin(policy_chosen_logps, policy_rejected_logps,
                       reference_chosen_logps, reference_rejected_logps)
    # log q from logsigmoid, so a large |z| gives q = 0 times a finite log, not 0 * log(0)
    log_qc, log_qr = F.logsigmoid(z), F.logsigmoid(-z)
    return (log_qc.exp() * (log_qc - math.log1p(-epsilon))
            + log_qr.exp() * (log_qr - math.log(epsilon)))


def hinge(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-example hinge loss of RSO (Liu et al. 2023, "Statistical Rejection
    Sampling Improves Preference Optimization", arXiv 2309.06657, the
    "hinge-norm" loss, i.e. SLiC's hinge on the normalised likelihood), shape [B]:

        max(0, 1 - gamma * h),   gamma = beta

    RSO calls the scale gamma; it is exposed as `beta`, as TRL's
    loss_type="hinge" does, so the trainer's reward metrics beta * log-ratio
    are on the same scale. The loss is 0, with zero gradient, once gamma * h >= 1.
    Only the loss: RSO's rejection sampling of the pairs needs a reward model.
    """
    _check_hyperparameter("beta", beta)
    _check_tensors(dict(zip(TENSOR_ARGS, (
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, chosen_lengths, rejected_lengths))))
    h = _margin(policy_chosen_logps, policy_rejected_logps,
                reference_chosen_logps, reference_rejected_logps)
    return torch.relu(1.0 - beta * h)


def minor_dpo(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-example MinorDPO loss ("Minor DPO reject penalty to increase training
    robustness", arXiv 2408.09834), shape [B]:

        -log sigmoid(beta * ((pc - rc) - max(0, pr - rr)))

    The rejected response is pushed down only while the policy gives it more
    probability than the reference: once pr - rr <= 0 its log-ratio is
    clamped to 0 and gets no gradient (the loss is then -log sigmoid(beta (pc - rc))).
    Where pr - rr >= 0 it is exactly dpo.
    """
    _check_hyperparameter("beta", beta)
    _check_tensors(dict(zip(TENSOR_ARGS, (
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, chosen_lengths, rejected_lengths))))
    rejected_logratio = (policy_rejected_logps - reference_rejected_logps).clamp(min=0.0)
    return -F.logsigmoid(beta * ((policy_chosen_logps - reference_chosen_logps) - rejected_logratio))


@functools.lru_cache(maxsize=64)
def _ada_dpo_unit_margin(rho: float) -> float:
    """The u > 0 with H(sigmoid(u)) = log 2 - rho (H the binary entropy in nats),
    for 0 < rho < log 2, by bisection in float64. H(sigmoid(u)) falls from
    log 2 at u = 0 towards 0, so the root is unique."""
    target = math.log(2.0) - rho

    def entropy(u: float) -> float:
        # H(sigmoid(u)) = -log sigmoid(u) + u * sigmoid(-u), written for u >= 0
        e = math.exp(-u)
        return math.log1p(e) + u * e / (1.0 + e)

    lo, hi = 0.0, 1.0
    while entropy(hi) > target:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):  # the bracket is one ulp wide
            break
        if entropy(mid) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _ada_dpo_tau(z: torch.Tensor, tau0: float, tau_max: float, rho: float) -> torch.Tensor:
    """Per-pair minimiser over [tau0, tau_max] of -tau log sigmoid(z / tau) + (rho - log 2) tau.

    Its tau-derivative is H(sigmoid(z / tau)) - log 2 + rho, increasing in tau
    when z != 0 (strict convexity), so the minimiser is clip(|z| / u, tau0, tau_max)
    with u from _ada_dpo_unit_margin. rho = 0 makes the derivative <= 0
    everywhere (tau_max; at z = 0 every tau ties and tau_max is kept for
    continuity); rho >= log 2 makes it >= 0 (tau0).
    """
    if rho == 0:
        return torch.full_like(z, tau_max)
    if rho >= math.log(2.0):
        return torch.full_like(z, tau0)
    return (z.abs() / _ada_dpo_unit_margin(rho)).clamp(min=tau0, max=tau_max)


def ada_dpo(
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    tau0: float,
    tau_max: float,
    rho: float,
) -> torch.Tensor:
    """Per-example Ada-DPO loss (Hong et al. 2024, "Adaptive Preference Scaling for
    Reinforcement Learning with Human Feedback", arXiv 2406.02764: eqs. 4 and 6
    with DPO's reward beta * log-ratio, §3.5), shape [B]:

        min over tau in [tau0, tau_max] of  -tau * log sigmoid(beta h / tau) + (rho - log 2) * tau

    Each pair gets its own scale tau_i, the Lagrange multiplier of a per-pair
    KL-constrained DRO problem (eq. 3). `rho` is that problem's KL radius, the
    paper's rho_0 (the authors' code also calls it rho; their DPO defaults are
    rho = 0.2, tau in [0.1, 5]); eq. 6 writes the penalty as rho' * tau with
    rho' = rho_0 - log 2.

    beta: the paper's §3.5 formula merges beta into tau and rho; keeping beta
    inside, as the authors' DPO trainer does, makes tau0 = tau_max = 1 give
    dpo + (rho - log 2) (a constant shift) and keeps the authors' tau bounds.

    The inner problem is solved exactly per pair (see _ada_dpo_tau):
    tau* = clip(|beta h| / u, tau0, tau_max) with H(sigmoid(u)) = log 2 - rho,
    u found once per call by bisection. The paper (eqs. 8-9, Algorithm 1)
    takes K projected Newton steps from tau = 1 per pair, K = 5 in the authors'
    code; tau* is the point those steps converge to.

    Gradient: tau* is computed under torch.no_grad and held fixed. By Danskin's
    theorem the gradient of the minimum over tau is the objective's gradient at
    tau*: d/dh = -beta * sigmoid(-beta h / tau*). The returned value includes
    the (rho - log 2) * tau* term, which carries no gradient (the authors' code
    leaves it out of the reported loss).
    """
    for name, value in (("beta", beta), ("tau0", tau0), ("tau_max", tau_max), ("rho", rho)):
        _check_hyperparameter(name, value)
    _check_tau_bounds(tau0, tau_max)
    _check_tensors(dict(zip(TENSOR_ARGS, (
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, chosen_lengths, rejected_lengths))))
    z = beta * _margin(policy_chosen_logps, policy_rejected_logps,
                       reference_chosen_logps, reference_rejected_logps)
    with torch.no_grad():
        tau = _ada_dpo_tau(z.detach(), tau0, tau_max, rho)
    return -tau * F.logsigmoid(z / tau) + (rho - math.log(2.0)) * tau


# --------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------

def rewards(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """Implicit DPO reward beta * (log pi - log ref), detached (for logging only)."""
    _check_hyperparameter("beta", beta)
    if policy_logps.shape != reference_logps.shape:
        raise ValueError(
            f"reference_logps has shape {tuple(reference_logps.shape)}; "
            f"expected {tuple(policy_logps.shape)}, the shape of policy_logps"
        )
    return (beta * (policy_logps - reference_logps)).detach()


# --------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------

LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "dpo": dpo,
    "rpo": rpo,
    "rpo_mean": rpo_mean,
    "rpo_seqmean": rpo_seqmean,
}

# The methods named next to the paper (paper.md, "Related methods").
RELATED_LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "ipo": ipo,
    "exo_pair": exo_pair,
    "hinge": hinge,
    "minor_dpo": minor_dpo,
    "ada_dpo": ada_dpo,
}

SFT_SUFFIX = "+sft"
# Losses without an SFT term of their own, which "<name>+sft" extends
# (the rpo variants already have one).
SFT_BASES: tuple[str, ...] = ("dpo", *RELATED_LOSSES)
_WITH_SFT: dict[str, Callable[..., torch.Tensor]] = {}


def _with_sft(base_name: str) -> Callable[..., torch.Tensor]:
    """`base_name`'s loss plus rpo's SFT term eta * beta * (-policy_chosen_logps)
    (paper eq. 4.8), with the base's keyword-only signature plus `eta`."""
    base = get_loss(base_name)
    base_sig = inspect.signature(base)
    eta_param = inspect.Parameter("eta", inspect.Parameter.KEYWORD_ONLY, annotation="float")
    sig = base_sig.replace(parameters=[*base_sig.parameters.values(), eta_param])

    def loss_with_sft(**kwargs) -> torch.Tensor:
        # bind() raises TypeError for a missing or unexpected keyword, as a def would
        args = dict(sig.bind(**kwargs).arguments)
        eta = args.pop("eta")
        _check_hyperparameter("eta", eta)
        # the same expression as rpo, so get_loss("dpo+sft") equals rpo exactly
        return base(**args) + (eta * args["beta"]) * (-args["policy_chosen_logps"])

    loss_with_sft.__signature__ = sig
    loss_with_sft.__name__ = loss_with_sft.__qualname__ = f"{base.__name__}_sft"
    loss_with_sft.__doc__ = (
        f"Per-example {base_name!r} loss plus eta * beta * (-policy_chosen_logps), shape [B]:\n"
        "rpo's summed-NLL SFT term on the chosen response (paper eq. 4.8).\n\n"
        f"{base_name}: {base.__doc__}"
    )
    return loss_with_sft


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    """The loss function registered under `name` (a name of LOSSES or
    RELATED_LOSSES, or "<base>+sft" for a base in SFT_BASES); ValueError
    listing the valid names otherwise."""
    if isinstance(name, str):
        if name in LOSSES:
            return LOSSES[name]
        if name in RELATED_LOSSES:
            return RELATED_LOSSES[name]
        if name.endswith(SFT_SUFFIX):
            base = name[: -len(SFT_SUFFIX)]
            if base in SFT_BASES:
                if name not in _WITH_SFT:
                    _WITH_SFT[name] = _with_sft(base)
                return _WITH_SFT[name]
            if base in LOSSES:
                raise ValueError(f"unknown loss {name!r}: {base!r} already has an SFT term; "
                                 f"{SFT_SUFFIX!r} extends one of: {', '.join(SFT_BASES)}")
    raise ValueError(
        f"unknown loss {name!r}; expected one of: {', '.join([*LOSSES, *RELATED_LOSSES])}; "
        f"or one of {', '.join(SFT_BASES)} with the suffix {SFT_SUFFIX!r} (e.g. 'ipo+sft')"
    )


def preference_part(name: str) -> str:
    """The name of loss `name` without its SFT term: "dpo" for the rpo variants, the base of "<base>+sft",
    and `name` itself for a loss without one (whose SFT part is then zero). The trainer logs
    loss/sft = loss - preference part."""
    get_loss(name)  # unknown names fail here, with the usual message
    if name in ("rpo", "rpo_mean", "rpo_seqmean"):
        return "dpo"
    if name.endswith(SFT_SUFFIX):
        return name[: -len(SFT_SUFFIX)]
    return name


def loss_hyperparameters(name: str) -> tuple[str, ...]:
    """Hyperparameter keyword names of loss `name`, in signature order
    (every keyword argument except the six tensors), e.g. ('beta', 'eta')."""
    params = inspect.signature(get_loss(name)).parameters
    return tuple(p for p in params if p not in TENSOR_ARGS)


def check_hyperparameters(name: str, params: dict, where: str) -> None:
    """Raise ValueError (prefixed by `where`, e.g. "config methods.rpo") unless
    `params` has exactly the hyperparameters of loss `name`, each with a legal value.

    Meant for a config validator, so a bad method fails before any training.
    """
    try:
        expected = loss_hyperparameters(name)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    missing = [k for k in expected if k not in params]
    unexpected = sorted(str(k) for k in params if k not in expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing hyperparameter(s): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected hyperparameter(s): {', '.join(unexpected)}")
        raise ValueError(
            f"{where}: loss {name!r} " + "; ".join(parts)
            + f"; expected exactly: {', '.join(expected)}"
        )
    try:
        for key in expected:
            _check_hyperparameter(key, params[key])
        if "tau0" in expected and "tau_max" in expected:
            _check_tau_bounds(params["tau0"], params["tau_max"])
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
