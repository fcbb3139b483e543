"""Proxy reward models and their ensembles (Coste et al., "Reward Model Ensembles Help Mitigate
Overoptimization", ICLR 2024; code: tlc4418/llm_optimization).

    python -m rpo train-reward-model --args '<json>'   (one member: train_reward_model)
    python -m rpo score-candidates   --args '<json>'   (one member's score of every sampled response)

A member is the base/SFT model with a scalar head (transformers' AutoModelForSequenceClassification,
num_labels 1) whose score is read at the LAST token of prompt + response (Open-Assistant's `pooling: last`,
which Coste et al.'s trainer inherits). It is trained on preference pairs with Open-Assistant's RMLoss
(their `configs/config_rm.yaml`: `loss_fn: RMLoss`, `score_l2_reg: 0.001`), per pair

    -log sigmoid(s_w - s_l) + l2 * 1/2 * (s_w^2 + s_l^2),

the Bradley-Terry loss plus a magnitude penalty that pins the scores' free offset near 0. The members of
an ensemble share data and every setting but the seed, which draws the head's initial weights, the LoRA
initialisation and the order of the data.

Ensemble objectives over the k members' scores R_1..R_k of one response (Coste et al. Sec. 3):
    mean   (1/k) sum_i R_i
    wco    min_i R_i                                    (worst-case optimisation)
    uwo    mean - lambda * (1/k) sum_i (R_i - mean)^2   (uncertainty-weighted; the POPULATION variance, as
                                                         their best-of-n code's np.var; their PPO code's
                                                         torch.var is the sample variance)
The scores are aggregated raw, as their code does (no standardisation of the members).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

OBJECTIVES = ("mean", "wco", "uwo")


# ---------------------------------------------------------------------------------------------------
# Loss and ensemble objectives (pure)
# ---------------------------------------------------------------------------------------------------

def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, *, l2: float = 0.001) -> torch.Tensor:
    """Per-pair reward-model loss, shape [B]: -log sigmoid(s_w - s_l) + l2 * (s_w^2 + s_l^2) / 2
    (Open-Assistant's RMLoss on a ranking of two; `l2` is its beta, 0.001 in Coste et al.)."""
    if chosen.shape != rejected.shape:
        raise ValueError(f"reward_loss: chosen scores {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} differ")
    if not l2 >= 0:
        raise ValueError(f"reward_loss: l2 must be >= 0, got {l2!r}")
    return -F.logsigmoid(chosen - rejected) + l2 * 0.5 * (chosen ** 2 + rejected ** 2)


def ensemble_objective(scores, objective: str, *, lam: float = 0.5) -> np.ndarray:
    """Aggregate member scores `scores` ([k members, ...]) over the members (axis 0) by `objective`
    (OBJECTIVES; module docstring); `lam` is UWO's lambda (0.5 in Coste et al.'s best-of-n)."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise ValueError("ensemble_objective: no member scores (expected an array [members, ...])")
    if objective == "mean":
        return arr.mean(axis=0)
    if objective == "wco":
        return arr.min(axis=0)
    if objective == "uwo":
        return arr.mean(axis=0) - lam * arr.var(axis=0, ddof=0)
    raise ValueError(f"ensemble objective {objective!r}: expected one of {OBJECTIVES}")
