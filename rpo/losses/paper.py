"""The paper's losses: DPO, RPO (eq. 4.8) and its two named variants (see rpo.losses)."""

from __future__ import annotations

from rpo.losses._common import _check_hyperparameter, _check_lengths_positive, _dpo, _reciprocal, checked, torch

# --------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------

@checked
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
    return _dpo(policy_chosen_logps, policy_rejected_logps,
                reference_chosen_logps, reference_rejected_logps, beta)


@checked
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
    dpo_loss = _dpo(policy_chosen_logps, policy_rejected_logps,
                    reference_chosen_logps, reference_rejected_logps, beta)
    return dpo_loss + (eta * beta) * (-policy_chosen_logps)


@checked
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
    _check_lengths_positive("chosen_lengths", chosen_lengths)
    dpo_loss = _dpo(policy_chosen_logps, policy_rejected_logps,
                    reference_chosen_logps, reference_rejected_logps, beta)
    batch = policy_chosen_logps.shape[0]
    # B / total chosen tokens, formed in float64 so a large token count is
    # not rounded (e.g. to bfloat16) before the division.
    total_tokens = chosen_lengths.to(torch.float64).sum()
    scale = (batch / total_tokens).to(policy_chosen_logps.dtype)
    return dpo_loss + alpha * (-policy_chosen_logps) * scale


@checked
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
