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

The registry (LOSSES, get_loss, loss_hyperparameters, check_hyperparameters)
lets a config validator check a method's hyperparameters before training.
"""

from __future__ import annotations

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
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if name == "beta" and not value > 0:
        raise ValueError(f"beta must be > 0, got {value!r}")
    if name in ("eta", "alpha") and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


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


def get_loss(name: str) -> Callable[..., torch.Tensor]:
    """The loss function registered under `name`; ValueError listing the names otherwise."""
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}; expected one of: {', '.join(LOSSES)}") from None


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
    for key in expected:
        try:
            _check_hyperparameter(key, params[key])
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
