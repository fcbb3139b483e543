"""The online methods' losses and estimators (issue 27): pure functions over per-example (or per-group)
tensors, used by the round trainer (rpo.round_train) on each round's own samples.

Pair losses, with the six tensors of every pair loss (rpo.losses) and the previous round's policy π_t:
  inpo        Zhang et al. 2024 (INPO), (h_t - 1/(2 eta))^2 with h_t mixing π_ref and π_t;
  mpo         Jiang et al. 2023 (MPO), the self-normalised importance-sampled preference reward plus the
              off-policy (forward) KL to the reference on reference samples.
Sequence losses:
  superhf     Mukobi et al. 2023 (SuperHF), the kept completions' NLL plus kl_coef * sum max(KL_i, 0);
  rloo_kl     REINFORCE with a leave-one-out baseline over K samples per prompt (Kool et al. 2019; Ahmadian et
  rloo_chi2   al. 2024), regularised by the KL or by the square root of the chi^2 divergence of the occupancy
              measures with the estimator of Laidlaw et al. ("Correlated Proxies", 2024).

Every log-probability is a response's log-probability SUMMED over its tokens, as in rpo.losses.
"""

from __future__ import annotations

import math

from rpo.losses._common import torch

# The tensors an online loss takes besides rpo.losses.TENSOR_ARGS (not hyperparameters).
PREVIOUS_ARGS = ("previous_chosen_logps", "previous_rejected_logps")
ONLINE_TENSOR_ARGS = (*PREVIOUS_ARGS, "reference_sample_logps", "logps", "behaviour_logps", "reference_logps",
                      "rewards", "token_nll", "step_tokens", "kl_per_token")

# Laidlaw et al.'s clip of the sequence log-ratio (src/ppo/custom_trlx_trainers/modeling.py, log_ratio_clip = 10)
OCCUPANCY_CLIP = 10.0


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_nonnegative(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _same_shape(**tensors: torch.Tensor) -> None:
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"these inputs must share one shape, got {shapes}")


# --------------------------------------------------------------------------
# INPO
# --------------------------------------------------------------------------

def inpo_margin(*, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                previous_chosen_logps, previous_rejected_logps, ratio: float) -> torch.Tensor:
    """INPO's h_t(y, y') = log π(y)/π(y') − (τ/η) log π_ref(y)/π_ref(y') − (1 − τ/η) log π_t(y)/π_t(y'),
    with `ratio` = τ/η (the authors' `--ratio`)."""
    return ((policy_chosen_logps - policy_rejected_logps)
            - ratio * (reference_chosen_logps - reference_rejected_logps)
            - (1.0 - ratio) * (previous_chosen_logps - previous_rejected_logps))


def inpo(*, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
         reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
         chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
         previous_chosen_logps: torch.Tensor, previous_rejected_logps: torch.Tensor,
         eta: float, ratio: float) -> torch.Tensor:
    """Per-example INPO loss (Zhang et al. 2024, "Iterative Nash Policy Optimization", arXiv 2407.00617), [B]:

        (h_t(y_w, y_l) − 1/(2η))²,   h_t as inpo_margin, π_t the previous round's policy.

    This is the authors' trainer exactly (inpo_original/inpo/trainer.py, `inpo_loss`: logits = pi_logratios −
    ratio·ref_logratios − (1 − ratio)·last_logratios; losses = (logits − 1/(2·eta))², summed sequence
    log-probs; run_inpo.sh: ratio 1/3, eta 0.005). It is the pair form of the paper's population loss
    L_t(π) = E_{y,y'∼π_t}[(h_t(π; y, y') − (I(y, y') − ½)/η)²] (I = 1 when y is preferred): a pair (y_w, y_l)
    enters as (y_w, y_l, I = 1) and (y_l, y_w, I = 0), both giving (h_t − 1/(2η))² since h_t is antisymmetric.
    Its minimiser over all policies is the online-mirror-descent step the paper builds on (the issue's
    "Eq. 5"): π_{t+1}(y) ∝ π_t(y)^{1−τ/η} π_ref(y)^{τ/η} exp(P(y ≻ π_t)/η) (tests/test_losses_online.py checks
    this on a 3-arm bandit). ratio = τ/η = 1 drops π_t and gives IPO's eq. 17 with UNNORMALISED sequence
    log-ratios and β = η; rpo.losses.ipo length-normalises them as TRL does, so the two agree only with
    lengths 1. The lengths are accepted for the common signature and unused (the authors' len_penalty is 0).
    """
    _check_positive("eta", eta)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio (tau/eta) must be in [0, 1], got {ratio!r}")
    _same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                reference_chosen_logps=reference_chosen_logps, reference_rejected_logps=reference_rejected_logps,
                previous_chosen_logps=previous_chosen_logps, previous_rejected_logps=previous_rejected_logps)
    h = inpo_margin(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                    reference_chosen_logps=reference_chosen_logps, reference_rejected_logps=reference_rejected_logps,
                    previous_chosen_logps=previous_chosen_logps, previous_rejected_logps=previous_rejected_logps,
                    ratio=ratio)
    return (h - 1.0 / (2.0 * eta)) ** 2


def inpo_mirror_descent_step(pi_t: torch.Tensor, pi_ref: torch.Tensor, preference: torch.Tensor, *, eta: float,
                             ratio: float) -> torch.Tensor:
    """The closed form INPO's loss recovers, on a finite set of responses (rows: prompts, or one row):
    π_{t+1} ∝ π_t^{1−τ/η} π_ref^{τ/η} exp(P(y ≻ π_t)/η), with P(y ≻ π_t) = Σ_{y'} P[y, y'] π_t(y')."""
    wins = preference @ pi_t
    logits = (1.0 - ratio) * pi_t.log() + ratio * pi_ref.log() + wins / eta
    return torch.softmax(logits, dim=-1)


# --------------------------------------------------------------------------
# MPO
# --------------------------------------------------------------------------

def mpo(*, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
        reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
        chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor,
        previous_chosen_logps: torch.Tensor, previous_rejected_logps: torch.Tensor,
        reference_sample_logps: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-example MPO loss (Jiang, Huang, Wei 2023, "Preference as Reward, Maximum Preference Optimization
    with Importance Sampling", arXiv 2312.16430), [B]:

        −w(y_w) + kl_coef · (−log π(y_ref | x)),   w(y_w) = σ((log π(y_w) − log μ(y_w)) − (log π(y_l) − log μ(y_l)))

    Derived from the paper's set-up as its abstract and §1 state it (the equation numbers could not be checked
    here: the paper's text was not reachable, docs/online.md): the reward of a response is its preference
    ("preference as reward"), so the objective is the expected preference E_{y∼π}[P(y ≻ ·)], which data from a
    behaviour policy μ estimate by importance sampling. Over one labelled pair the self-normalised importance
    weight of the preferred response is (π/μ)(y_w) / ((π/μ)(y_w) + (π/μ)(y_l)) = w(y_w) above, and the
    pair's preference reward is I·w(y_w) + (1 − I)·w(y_l) = w(y_w) for the labelled order: MPO maximises it.
    Here μ is the previous round's policy, which sampled the pair (`previous_*`); for offline data with an
    unknown μ, the paper's case, μ's log-ratio is 0 (μ uniform over the pair) and the term is
    σ(log π(y_w) − log π(y_l)): no reward model and no reference log-probabilities, as the paper says. The
    KL regulariser is off-policy: the reverse KL(π‖π_ref) would need samples of π, so MPO uses the forward
    KL(π_ref‖π) = E_{y∼π_ref}[−log π(y)] + const on responses SAMPLED FROM THE REFERENCE
    (`reference_sample_logps`: log π of one reference sample for the pair's prompt). The paper's further
    pre-training-data term is left out (no pre-training corpus offline). reference_* and the lengths are
    accepted for the common signature and unused.
    """
    _check_nonnegative("kl_coef", kl_coef)
    _same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                previous_chosen_logps=previous_chosen_logps, previous_rejected_logps=previous_rejected_logps,
                reference_sample_logps=reference_sample_logps)
    w = torch.sigmoid((policy_chosen_logps - previous_chosen_logps) - (policy_rejected_logps - previous_rejected_logps))
    return -w + kl_coef * (-reference_sample_logps)


# --------------------------------------------------------------------------
# SuperHF
# --------------------------------------------------------------------------

def forward_kl_per_token(policy_logits: torch.Tensor, reference_logits: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """KL(π_ref‖π_θ) at each masked position, averaged over a sequence's masked positions: [B].

    policy_logits, reference_logits: [B, T, V]; mask: [B, T], True where the position predicts a completion
    token. This is SuperHF's per-completion KL (openfeedback/superhf src/superhf/training.py,
    `finetune_language_model`: torch.nn.KLDivLoss(reduction="batchmean", log_target=True)(log π_θ, log π_ref)
    over one completion's positions, i.e. Σ_t Σ_v π_ref(v) (log π_ref(v) − log π_θ(v)) / T_i)."""
    if policy_logits.shape != reference_logits.shape or policy_logits.shape[:2] != mask.shape:
        raise ValueError(f"logits {tuple(policy_logits.shape)} / {tuple(reference_logits.shape)} and mask "
                         f"{tuple(mask.shape)} do not fit ([B, T, V] and [B, T])")
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("forward_kl_per_token: a sequence has no completion position")
    dtype = torch.promote_types(policy_logits.dtype, torch.float32)  # at least float32: bf16 logits are cast
    log_p = torch.log_softmax(policy_logits.to(dtype), dim=-1)
    log_q = torch.log_softmax(reference_logits.to(dtype), dim=-1)
    per_pos = (log_q.exp() * (log_q - log_p)).sum(dim=-1)
    return (per_pos * mask).sum(dim=1) / counts


def superhf(*, token_nll: torch.Tensor, step_tokens: int, kl_per_token: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-example share of SuperHF's loss (Mukobi et al. 2023, "SuperHF: Supervised Iterative Learning from
    Human Feedback", arXiv 2310.16763; openfeedback/superhf src/superhf/training.py), [B]:

        token_nll_i / step_tokens + kl_coef · max(KL_i, 0)

    so that the sum over an optimizer step's kept completions is the paper's minibatch loss: the cross-entropy
    of the kept completions, the token mean over the step (the model's own `outputs.loss`), plus
    kl_coef · Σ_i max(KL_i, 0) (the paper's β, the code's `kl_coefficient`), KL_i the per-token forward KL(π_ref‖π_θ) averaged over the completion
    (forward_kl_per_token; clamped at 0 "to avoid negative KL gaming due to the approximation"). token_nll:
    each completion's summed NLL (−log π_θ); step_tokens: the completion tokens of the whole step."""
    _check_nonnegative("kl_coef", kl_coef)
    if isinstance(step_tokens, bool) or not isinstance(step_tokens, int) or step_tokens < 1:
        raise ValueError(f"step_tokens must be an int >= 1, got {step_tokens!r}")
    _same_shape(token_nll=token_nll, kl_per_token=kl_per_token)
    return token_nll / step_tokens + kl_coef * kl_per_token.clamp(min=0.0)


# --------------------------------------------------------------------------
# REINFORCE leave-one-out, regularised by the KL or the chi^2 of the occupancy measures
# --------------------------------------------------------------------------

def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """[G, K] rewards of K samples per prompt -> advantages A_k = r_k − mean_{j≠k} r_j (the leave-one-out
    baseline of Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!"; RLOO, Ahmadian et al.
    2024). They sum to zero within a prompt; the baseline is independent of sample k, so the gradient stays
    unbiased."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, K >= 2], got shape {tuple(rewards.shape)}")
    k = rewards.shape[1]
    return rewards - (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)


def reinforce_loo(*, logps: torch.Tensor, behaviour_logps: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Per-prompt REINFORCE-LOO surrogate, [G]: −(1/K) Σ_k A_k · π_θ(y_k)/μ(y_k), A = rloo_advantages(rewards).

    μ is the policy that sampled the round (`behaviour_logps`, held fixed): at θ = μ the ratio is 1 and the
    gradient is exactly REINFORCE's −(1/K) Σ_k A_k ∇ log π_θ(y_k); later steps of the same round keep it an
    unbiased importance-weighted estimate (the unclipped PPO surrogate) instead of silently reusing stale
    samples as if on-policy."""
    _same_shape(logps=logps, behaviour_logps=behaviour_logps, rewards=rewards)
    adv = rloo_advantages(rewards).detach()
    ratio = torch.exp(logps - behaviour_logps.detach())
    return -(adv * ratio).mean(dim=1)


def _expm1_linear(x: torch.Tensor, clip: float) -> torch.Tensor:
    # e^x − 1 for x < clip, continued by its tangent at clip: e^clip (1 + x − clip) − 1 (same value and slope)
    return torch.where(x >= clip, math.exp(clip) * (1.0 + x - clip) - 1.0, torch.special.expm1(x.clamp(max=clip)))


def occupancy_terms(log_ratio: torch.Tensor, clip: float = OCCUPANCY_CLIP) -> tuple[torch.Tensor, torch.Tensor]:
    """(ratio − 1, 1/ratio − 1) of each rollout's sequence log-ratio ℓ = Σ_t (log π_θ − log π_ref), each
    exponential clipped at `clip` with a linear extension (Laidlaw et al., cassidylaidlaw/llm_optimization
    src/ppo/custom_trlx_trainers/modeling.py, PPOWithRefPolicyConfig.loss: ratio_m_1, inv_ratio_m_1)."""
    return _expm1_linear(log_ratio, clip), _expm1_linear(-log_ratio, clip)


def chi2_estimate(log_ratio: torch.Tensor, clip: float = OCCUPANCY_CLIP) -> torch.Tensor:
    """χ̂² = mean[(e^ℓ − 1) + (e^{−ℓ} − 1)] over rollouts of π_θ (Laidlaw et al., as occupancy_terms). Under
    y ∼ π, E[e^ℓ − 1] = Σ π²/π_ref − 1 = χ²(π‖π_ref) and E[e^{−ℓ} − 1] = Σ π_ref − 1 = 0: the second term is a
    control variate (zero mean, negatively correlated with the first)."""
    up, down = occupancy_terms(log_ratio, clip)
    return (up + down).mean()


def kl_estimate(log_ratio: torch.Tensor, clip: float = OCCUPANCY_CLIP) -> torch.Tensor:
    """K̂L = mean[ℓ + (e^{−ℓ} − 1)] over rollouts of π_θ: Laidlaw et al.'s KL with the same control variate."""
    _, down = occupancy_terms(log_ratio, clip)
    return (log_ratio + down).mean()


def _rloo_parts(logps, behaviour_logps, reference_logps, rewards):
    _same_shape(logps=logps, behaviour_logps=behaviour_logps, reference_logps=reference_logps, rewards=rewards)
    return reinforce_loo(logps=logps, behaviour_logps=behaviour_logps, rewards=rewards).mean(), logps - reference_logps


def rloo_kl(*, logps: torch.Tensor, behaviour_logps: torch.Tensor, reference_logps: torch.Tensor,
            rewards: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """REINFORCE-LOO on [G, K] samples plus kl_coef · K̂L (kl_estimate of the sequence log-ratios against the
    reference), a scalar over the batch: Laidlaw et al.'s `kl_weight * kl` regulariser in the loss."""
    _check_nonnegative("kl_coef", kl_coef)
    pg, log_ratio = _rloo_parts(logps, behaviour_logps, reference_logps, rewards)
    return pg + kl_coef * kl_estimate(log_ratio.flatten())


def rloo_chi2(*, logps: torch.Tensor, behaviour_logps: torch.Tensor, reference_logps: torch.Tensor,
              rewards: torch.Tensor, chi2_coef: float) -> torch.Tensor:
    """REINFORCE-LOO on [G, K] samples plus chi2_coef · √max(χ̂², 1e-4) (chi2_estimate over the batch's
    rollouts): Laidlaw et al.'s `sqrt_chi2_weight * torch.sqrt(chi2.clip(min=1e-4))` (their RLHF runs: 0.0008),
    a scalar over the batch."""
    _check_nonnegative("chi2_coef", chi2_coef)
    pg, log_ratio = _rloo_parts(logps, behaviour_logps, reference_logps, rewards)
    return pg + chi2_coef * torch.sqrt(chi2_estimate(log_ratio.flatten()).clamp(min=1e-4))


# What each online loss needs from a round (rpo.round_train): its kind of data and the extra log-probs.
#   pairs: rows with a chosen and a rejected response (selection best_worst or tournament)
#   kept:  kept completions (selection top_k)
#   groups: every sample of a prompt with its reward (selection all)
ONLINE_LOSSES = {"inpo": inpo, "mpo": mpo, "superhf": superhf, "rloo_kl": rloo_kl, "rloo_chi2": rloo_chi2}
ONLINE_DATA = {"inpo": "pairs", "mpo": "pairs", "superhf": "kept", "rloo_kl": "groups", "rloo_chi2": "groups"}
NEEDS_PREVIOUS = frozenset({"inpo", "mpo", "rloo_kl", "rloo_chi2"})
NEEDS_REFERENCE_SAMPLES = frozenset({"mpo"})


def check_online_hyperparameters(name: str, params: dict) -> None:
    """What an online loss's hyperparameters must satisfy beyond rpo.losses' per-name checks."""
    if name == "inpo":
        _check_positive("eta", params["eta"])  # the target margin is 1/(2 eta)
