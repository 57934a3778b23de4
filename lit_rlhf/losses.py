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
