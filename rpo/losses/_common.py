"""What every loss of rpo.losses shares: the six tensor arguments, their checks, and two formulas."""

from __future__ import annotations

import functools
import importlib
import inspect
import math


class _Deferred:
    """A module imported at its first attribute access. The registry (names, signatures, hyperparameter checks)
    is read when the workflow is parsed (rpo.config.check_config), and parsing imports no torch (every cluster
    job re-parses it); the losses touch torch only when they are called."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        return getattr(importlib.import_module(self._name), attr)


torch = _Deferred("torch")
F = _Deferred("torch.nn.functional")

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
    if name in ("kl_coef", "chi2_coef") and not value >= 0:
        raise ValueError(f"{name} must be >= 0 (a regulariser's weight), got {value!r}")
    if name == "ratio" and not 0 <= value <= 1:
        raise ValueError(f"ratio (INPO's tau/eta) must be in [0, 1], got {value!r}")


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


def checked(loss):
    """A loss whose inputs are checked before it runs: each hyperparameter (a keyword argument not in
    TENSOR_ARGS) by _check_hyperparameter, then the six tensors by _check_tensors. The signature stays the
    loss's own (functools.wraps), so the registry still reads its hyperparameters from it."""
    hparams = [n for n in inspect.signature(loss).parameters if n not in TENSOR_ARGS]

    @functools.wraps(loss)
    def run(**kwargs):
        for name in hparams:
            if name in kwargs:
                _check_hyperparameter(name, kwargs[name])
        if all(n in kwargs for n in TENSOR_ARGS):
            _check_tensors({n: kwargs[n] for n in TENSOR_ARGS})
        return loss(**kwargs)

    return run


def _check_lengths_positive(name: str, lengths: torch.Tensor) -> None:
    # `not (x > 0).all()` also rejects NaN lengths.
    if not bool((lengths > 0).all()):
        raise ValueError(f"{name} must be > 0 for every example, got {lengths.tolist()}")


def _reciprocal(lengths: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1 / lengths in `dtype`, rounded once: taking the reciprocal in float64
    first avoids rounding a long length to bfloat16 (8-bit mantissa) and then
    rounding the quotient again."""
    return (1.0 / lengths.to(torch.float64)).to(dtype)


def _dpo(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float) -> torch.Tensor:
    # -log sigmoid(beta * margin), margin = log-ratio(chosen) - log-ratio(rejected)
    # (Rafailov et al. 2023, eq. 7); logsigmoid is computed stably.
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def _margin(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
    # h = log-ratio(chosen) - log-ratio(rejected), the quantity DPO scales by beta
    return (pc - rc) - (pr - rr)
