"""Loss functions: tensors in, tensors out, no models."""

import torch
import torch.nn.functional as F

from lit_rlhf.ops import masked_mean


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


def rpo_nll_loss(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the chosen answers, per token: the term RPO (Pang et al. 2024,
    "Iterative Reasoning Preference Optimization") adds to the DPO loss, weighted by `rpo_alpha`.

    Args:
        chosen_logps: (B,) summed log-probs of the chosen completions under the policy.
        chosen_lengths: (B,) their token counts.

    Returns:
        () `-sum(chosen_logps) / sum(chosen_lengths)`: the mean over all chosen tokens of the batch.
    """
    return -chosen_logps.sum() / chosen_lengths.sum()


def aggregate_token_losses(losses: torch.Tensor, mask: torch.Tensor, aggregation: str = "token_mean", length: int = 1) -> torch.Tensor:
    """One loss from per-token losses: how each response's tokens are weighted. (B, T), (B, T) -> ()

    - `token_mean`: mean over every response token of the batch (PPO as in Huang et al. 2024, RLOO,
      REINFORCE++): a long response weighs more;
    - `sequence_mean`: the mean over each response's tokens, then over responses (GRPO): a token of a
      short response weighs more;
    - `constant`: each response's token sum divided by the constant `length` (e.g. the response length),
      then the mean over responses (Dr. GRPO): no length bias either way.
    """
    if aggregation == "token_mean":
        return masked_mean(losses, mask)
    if aggregation == "sequence_mean":
        return ((losses * mask).sum(1) / mask.sum(1)).mean()
    if aggregation == "constant":
        return (losses * mask).sum(1).mean() / length
    raise ValueError(f"unknown loss aggregation {aggregation!r}; use token_mean, sequence_mean or constant")


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
    aggregation: str = "token_mean",
    length: int = 1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate policy loss of PPO (Schulman et al. 2017).

    Args:
        logprobs: (B, T) log-probs of the response tokens under the current policy.
        old_logprobs: (B, T) the same under the policy that generated them.
        advantages: (B, T) advantages (whitened, or group-relative and the same on every token of a response).
        mask: (B, T) 1 on response tokens.
        cliprange: the ratio is clipped to [1 - cliprange, 1 + cliprange].
        aggregation, length: how the per-token losses become one (`aggregate_token_losses`).

    Returns:
        pg_loss (): `max(-A r, -A clip(r))` aggregated over response tokens, and stats: `clipfrac`
        (share of tokens where the clipped term is used), `approxkl` (`0.5 mean(log r ^ 2)`),
        `ratio` (mean r).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_losses = -advantages * ratio
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = aggregate_token_losses(torch.max(pg_losses, pg_losses_clipped), mask, aggregation, length)
    stats = {
        "clipfrac": masked_mean((pg_losses_clipped > pg_losses).float(), mask),
        "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
        "ratio": masked_mean(ratio, mask),
    }
    return pg_loss, {k: v.detach() for k, v in stats.items()}


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss of PPO.

    Args:
        values: (B, T) current value predictions.
        old_values: (B, T) predictions at rollout time.
        returns: (B, T) GAE returns (targets).
        mask: (B, T) 1 on response tokens.
        cliprange_value: the new prediction may move at most this far from the old one.

    Returns:
        vf_loss (): `0.5 mean(max((v - R)^2, (v_clipped - R)^2))`, and vf_clipfrac ().
    """
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    losses = (values - returns) ** 2
    losses_clipped = (values_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(losses, losses_clipped), mask)
    return vf_loss, masked_mean((losses_clipped > losses).float(), mask).detach()
