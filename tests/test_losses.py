"""Every loss against values worked out by hand."""

import math

import torch

from lit_rlhf.losses import reward_loss


def softplus(x: float) -> float:  # -log sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def test_reward_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    # -log sigmoid(2) = log(1 + e^-2) = 0.126928; -log sigmoid(0) = log 2 = 0.693147
    assert torch.isclose(reward_loss(chosen, rejected), torch.tensor((0.126928 + 0.693147) / 2), atol=1e-6)
    # margin 1: -log sigmoid(1) = 0.313262, -log sigmoid(-1) = 1.313262
    assert torch.isclose(reward_loss(chosen, rejected, margin=1.0), torch.tensor((0.313262 + 1.313262) / 2), atol=1e-6)


def test_reward_loss_gradient_pushes_chosen_up():
    chosen, rejected = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    reward_loss(chosen, rejected).backward()
    # d/dr_c of -log sigmoid(r_c - r_r) at 0 is -0.5, averaged over 3 rows
    assert torch.allclose(chosen.grad, torch.full((3,), -0.5 / 3))
    assert torch.allclose(rejected.grad, torch.full((3,), 0.5 / 3))
