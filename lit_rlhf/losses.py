"""Loss functions: tensors in, tensors out, no models."""

import torch
import torch.nn.functional as F


def reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Bradley-Terry loss of a reward model, `-log sigmoid(r_chosen - r_rejected - margin)`.

    Args:
        chosen_rewards: (B,) scores of the chosen completions.
        rejected_rewards: (B,) scores of the rejected completions.
        margin: how far chosen must score above rejected before the loss flattens.

    Returns:
        () mean loss over the batch.
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards - margin).mean()


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization loss (Rafailov et al. 2023) and its variants.

    With `h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))` per pair:
    - `sigmoid`: `-log sigmoid(beta h)`; with `label_smoothing` e, conservative DPO
      `-(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)`;
    - `robust` (Chowdhury et al. 2024): `(-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2e)`;
    - `hinge` (SLiC): `relu(1 - beta h)`;
    - `ipo` (Azar et al. 2023): `(h - 1 / (2 beta))^2`.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) sequence log-probs under the policy.
        ref_chosen_logps, ref_rejected_logps: (B,) sequence log-probs under the reference.
        beta: strength of the implicit KL penalty.
        loss_type: one of `sigmoid`, `robust`, `hinge`, `ipo`.
        label_smoothing: assumed share of flipped labels (sigmoid and robust), in [0, 0.5).

    Returns:
        losses (B,), chosen_rewards (B,), rejected_rewards (B,); the implicit rewards
        `beta * (log pi - log ref)` are detached.
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; use sigmoid, robust, hinge or ipo")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
