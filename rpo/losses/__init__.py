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

The online methods (rpo/losses/online.py, ONLINE_LOSSES: inpo, mpo, superhf, rloo_kl, rloo_chi2) are in
the registry too; they need a round's own data (the previous policy's log-probs, reference samples, kept
completions or groups of samples) and so train only as methods with `rounds` (rpo.round_train).

Any loss without an SFT term (dpo and the related ones) also exists as
"<name>+sft", which adds rpo's term eta * beta * (-pc); "dpo+sft" is rpo.

The registry (LOSSES, RELATED_LOSSES, get_loss, loss_hyperparameters,
check_hyperparameters) lets a config validator check a method's
hyperparameters before training.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Callable

from rpo.losses._common import TENSOR_ARGS, _check_hyperparameter, _check_tau_bounds
from rpo.losses.paper import dpo, rewards, rpo, rpo_mean, rpo_seqmean
from rpo.losses.online import ONLINE_LOSSES, ONLINE_TENSOR_ARGS, check_online_hyperparameters
from rpo.losses.related import ada_dpo, exo_pair, hinge, ipo, minor_dpo

if TYPE_CHECKING:  # annotations only: torch is imported at a loss's first call (rpo.losses._common)
    import torch

__all__ = ["TENSOR_ARGS", "LOSSES", "RELATED_LOSSES", "ONLINE_LOSSES", "SFT_BASES", "SFT_SUFFIX", "dpo", "rpo", "rpo_mean",
           "rpo_seqmean", "ipo", "exo_pair", "hinge", "minor_dpo", "ada_dpo", "rewards", "get_loss",
           "preference_part", "loss_hyperparameters", "check_hyperparameters"]


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
        if name in ONLINE_LOSSES:
            return ONLINE_LOSSES[name]
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
        f"or one of {', '.join(SFT_BASES)} with the suffix {SFT_SUFFIX!r} (e.g. 'ipo+sft'); "
        f"or, for a method with rounds, one of: {', '.join(ONLINE_LOSSES)}"
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
    return tuple(p for p in params if p not in TENSOR_ARGS and p not in ONLINE_TENSOR_ARGS)


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
        if name in ONLINE_LOSSES:
            check_online_hyperparameters(name, params)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
