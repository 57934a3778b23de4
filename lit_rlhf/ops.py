"""Shared tensor math: token log-probs, masked statistics, advantages."""

import torch

from lit_rlhf.data import IGNORE_INDEX


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`log_softmax(logits).gather(-1, index)` without a second (B, T, V) tensor.

    Args:
        logits: (B, T, V) unnormalised scores.
        index: (B, T) token ids.

    Returns:
        (B, T) log-probability of each token. `logsumexp` runs one row at a time, so the
        temporary it needs is (T, V), not (B, T, V).
    """
    picked = logits.gather(-1, index.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])


def completion_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the log-probs of the completion tokens of each sequence.

    Args:
        logits: (B, T, V) model outputs for the full sequence.
        labels: (B, T) token ids on completion tokens, IGNORE_INDEX on prompt and padding.

    Returns:
        (B,) `sum_t log p(labels_t | tokens_<t)` over completion tokens.
    """
    labels = labels[:, 1:]  # token t is predicted by the logits at t - 1
    mask = labels != IGNORE_INDEX
    token_logps = selective_log_softmax(logits[:, :-1], labels.clamp(min=0))  # (B, T-1)
    return (token_logps * mask).sum(-1)
