"""The related methods named next to the paper (paper.md), as pure losses (see rpo.losses)."""

from __future__ import annotations

import functools
import math

from rpo.losses._common import F, _check_lengths_positive, _check_tau_bounds, _margin, _reciprocal, checked, torch

# --------------------------------------------------------------------------
# related methods (paper.md, "Related methods"): same inputs, other objectives
# --------------------------------------------------------------------------

@checked
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
    _check_lengths_positive("chosen_lengths", chosen_lengths)
    _check_lengths_positive("rejected_lengths", rejected_lengths)
    dtype = policy_chosen_logps.dtype
    h_norm = ((policy_chosen_logps - reference_chosen_logps) * _reciprocal(chosen_lengths, dtype)
              - (policy_rejected_logps - reference_rejected_logps) * _reciprocal(rejected_lengths, dtype))
    return (h_norm - 1.0 / (2.0 * beta)) ** 2


@checked
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
    z = beta * _margin(policy_chosen_logps, policy_rejected_logps,
                       reference_chosen_logps, reference_rejected_logps)
    # log q from logsigmoid, so a large |z| gives q = 0 times a finite log, not 0 * log(0)
    log_qc, log_qr = F.logsigmoid(z), F.logsigmoid(-z)
    return (log_qc.exp() * (log_qc - math.log1p(-epsilon))
            + log_qr.exp() * (log_qr - math.log(epsilon)))


@checked
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
    h = _margin(policy_chosen_logps, policy_rejected_logps,
                reference_chosen_logps, reference_rejected_logps)
    return torch.relu(1.0 - beta * h)


@checked
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


@checked
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
    _check_tau_bounds(tau0, tau_max)
    z = beta * _margin(policy_chosen_logps, policy_rejected_logps,
                       reference_chosen_logps, reference_rejected_logps)
    with torch.no_grad():
        tau = _ada_dpo_tau(z.detach(), tau0, tau_max, rho)
    return -tau * F.logsigmoid(z / tau) + (rho - math.log(2.0)) * tau
