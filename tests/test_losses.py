"""Every loss against values worked out by hand."""

import inspect
import math

import pytest
import torch

from lit_rlhf.losses import (
    PREFERENCE_LOSSES,
    apo_zero,
    orpo,
    ppo_value_loss,
    rdpo,
    reward_loss,
    rpo_nll_loss,
    simpo,
    truncated_importance_weights,
)


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


# DPO: policy chosen -1, rejected -3; reference -2, -2 -> log-ratios +1 and -1, h = 2
POLICY = (torch.tensor([-1.0]), torch.tensor([-3.0]))
REF = (torch.tensor([-2.0]), torch.tensor([-2.0]))


def dpo(beta, loss_type, label_smoothing=0.0):
    function = PREFERENCE_LOSSES[loss_type].function
    options = {"label_smoothing": label_smoothing} if loss_type in ("sigmoid", "robust") else {}
    return function(*POLICY, *REF, beta=beta, **options).item()


def test_dpo_sigmoid_by_hand():
    # beta h = 1: -log sigmoid(1) = log(1 + e^-1) = 0.313262
    assert math.isclose(dpo(0.5, "sigmoid"), 0.313262, abs_tol=1e-6)
    # label smoothing 0.1: 0.9 * 0.313262 + 0.1 * 1.313262
    assert math.isclose(dpo(0.5, "sigmoid", 0.1), 0.413262, abs_tol=1e-6)


def test_dpo_robust_by_hand():
    # (0.9 * 0.313262 - 0.1 * 1.313262) / 0.8
    assert math.isclose(dpo(0.5, "robust", 0.1), 0.188262, abs_tol=1e-6)
    assert math.isclose(dpo(0.5, "robust", 0.0), dpo(0.5, "sigmoid"), abs_tol=1e-7)


def test_dpo_hinge_and_ipo_by_hand():
    assert math.isclose(dpo(0.25, "hinge"), 0.5)  # relu(1 - 0.25 * 2)
    assert dpo(0.5, "hinge") == 0.0  # relu(1 - 1)
    assert math.isclose(dpo(0.5, "ipo"), 1.0)  # (2 - 1 / (2 * 0.5))^2
    assert math.isclose(dpo(0.25, "ipo"), 0.0)  # (2 - 2)^2


def test_rdpo_by_hand():
    # h = 2, beta 0.5; chosen 5 tokens, rejected 2: -log sigmoid(1 + 0.1 * 3) = log(1 + e^-1.3) = 0.241008
    lengths = (torch.tensor([5]), torch.tensor([2]))
    assert math.isclose(rdpo(*POLICY, *lengths, *REF, beta=0.5, rdpo_alpha=0.1).item(), 0.241008, abs_tol=1e-6)
    # a longer chosen answer explains part of the preference: less loss, so less push on the log-ratios
    assert rdpo(*POLICY, *lengths, *REF, beta=0.5, rdpo_alpha=0.1) < rdpo(*POLICY, *lengths[::-1], *REF, beta=0.5, rdpo_alpha=0.1)
    assert math.isclose(rdpo(*POLICY, *lengths, *REF, beta=0.5, rdpo_alpha=0.0).item(), dpo(0.5, "sigmoid"), abs_tol=1e-7)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust"])
def test_dpo_at_policy_equal_reference_is_log_2(loss_type):
    logps = torch.tensor([-5.0, -7.0])
    losses = PREFERENCE_LOSSES[loss_type].function(logps, logps + 1, logps, logps + 1, beta=0.1)
    assert torch.equal(losses, torch.full((2,), math.log(2)))


def test_apo_zero_by_hand():
    # chosen log-ratio +1, rejected -1, beta 0.5: 1 - sigmoid(0.5) + sigmoid(-0.5) = 2 sigmoid(-0.5) = 0.755081
    assert math.isclose(apo_zero(*POLICY, *REF, beta=0.5).item(), 2 / (1 + math.exp(0.5)), abs_tol=1e-6)
    assert apo_zero(*REF, *REF, beta=0.5).item() == 1.0  # policy == reference


# SimPO and ORPO read length-normalised log-likelihoods: chosen -2 over 2 tokens (-1 each), rejected -6 over 3 (-2 each)
LOGPS, LENGTHS = (torch.tensor([-2.0]), torch.tensor([-6.0])), (torch.tensor([2]), torch.tensor([3]))


def test_simpo_by_hand():
    # -log sigmoid(beta (-1 - -2) - gamma) with beta 2, gamma 0.5: -log sigmoid(1.5) = log(1 + e^-1.5) = 0.201413
    assert math.isclose(simpo(*LOGPS, *LENGTHS, beta=2.0, simpo_gamma=0.5).item(), softplus(-1.5), abs_tol=1e-6)
    # equal normalised likelihoods and no margin: log 2
    assert math.isclose(simpo(torch.tensor([-2.0]), torch.tensor([-3.0]), *LENGTHS, beta=2.0, simpo_gamma=0.0).item(), math.log(2), abs_tol=1e-7)


def test_orpo_by_hand():
    # p_w = e^-1, p_l = e^-2; log odds = log(p / (1 - p)): -1 - log(1 - e^-1) = -0.541325, -2 - log(1 - e^-2) = -1.854683
    log_odds = (-1 - math.log(1 - math.exp(-1))) - (-2 - math.log(1 - math.exp(-2)))  # 1.313358
    expected = 1.0 + 0.1 * softplus(-log_odds)  # NLL per chosen token (1) - 0.1 log sigmoid(log_odds)
    assert math.isclose(orpo(*LOGPS, *LENGTHS, beta=0.1).item(), expected, abs_tol=1e-6)


@pytest.mark.parametrize("loss_type", [name for name, loss in PREFERENCE_LOSSES.items() if "labels" not in inspect.signature(loss.function).parameters])
def test_every_preference_loss_pushes_chosen_up_and_rejected_down(loss_type):
    function = PREFERENCE_LOSSES[loss_type].function
    chosen, rejected = torch.tensor([-4.0, -6.0], requires_grad=True), torch.tensor([-5.0, -5.0], requires_grad=True)
    values = {"chosen_logps": chosen, "rejected_logps": rejected, "chosen_lengths": torch.tensor([4, 6]),
              "rejected_lengths": torch.tensor([5, 5]), "ref_chosen_logps": torch.tensor([-4.0, -6.0]),
              "ref_rejected_logps": torch.tensor([-5.0, -5.0]), "beta": 0.5}  # fmt: skip
    names = [n for n in inspect.signature(function).parameters if n in values]
    function(**{n: values[n] for n in names}).sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()  # a gradient step raises chosen, lowers rejected


def test_truncated_importance_weights_by_hand():
    # trainer log-probs minus sampler log-probs: ln 0.5, 0, ln 3 -> ratios 0.5, 1, 3; the last is cut to the cap 2
    logprobs = torch.tensor([[math.log(0.25), -1.0, math.log(0.9)]])
    sampler = torch.tensor([[math.log(0.5), -1.0, math.log(0.3)]])
    weights = truncated_importance_weights(logprobs, sampler, cap=2.0)
    assert torch.allclose(weights, torch.tensor([[0.5, 1.0, 2.0]]))


def test_ppo_value_loss_by_hand():
    # inside the clip range: 0.5 * mean((1 - 0.5)^2, (0 - 0.5)^2) = 0.125
    loss, clipfrac = ppo_value_loss(torch.tensor([[0.1, 0.0]]), torch.zeros(1, 2), torch.tensor([[0.5, 0.5]]), torch.ones(1, 2))
    assert torch.isclose(loss, torch.tensor(0.5 * ((0.1 - 0.5) ** 2 + 0.25) / 2)) and clipfrac == 0
    # 0.6 from 0 clips to 0.2: max((0.6 - 1)^2, (0.2 - 1)^2) = 0.64 -> 0.32
    loss, clipfrac = ppo_value_loss(torch.tensor([[0.6]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), cliprange_value=0.2)
    assert torch.isclose(loss, torch.tensor(0.32)) and clipfrac == 1.0


def test_rpo_nll_is_the_mean_over_chosen_tokens():
    # two answers: 1 token with log-prob -2, 3 tokens summing to -6: (2 + 6) / (1 + 3) = 2
    assert rpo_nll_loss(torch.tensor([-2.0, -6.0]), torch.tensor([1, 3])).item() == 2.0


def test_kto_by_hand():
    from lit_rlhf.losses import kto

    logps, ref_logps, labels = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]), torch.tensor([True, False])  # r = +1, -1
    # mismatched log-ratios -0.5, +0.5: mean 0, so z = 0; both rows: 1 - sigmoid(0.5 * 1) = 0.377541
    z0 = kto(logps, ref_logps, torch.tensor([-2.5, -1.5]), torch.tensor([-2.0, -2.0]), labels, beta=0.5)
    assert torch.allclose(z0, torch.full((2,), 1 - 1 / (1 + math.exp(-0.5))), atol=1e-6)
    # mismatched log-ratios 1, 0: z = 0.5; desirable 1 - sigmoid(0.5 (1 - 0.5)), undesirable 1 - sigmoid(0.5 (0.5 + 1)), weighted
    z = kto(logps, ref_logps, torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0]), labels, beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)
    expected = [2.0 * (1 - 1 / (1 + math.exp(-0.25))), 0.5 * (1 - 1 / (1 + math.exp(-0.75)))]
    assert torch.allclose(z, torch.tensor(expected), atol=1e-6)
    # a negative KL estimate is clamped to 0; at policy == reference every row's loss is 1/2
    same = kto(ref_logps, ref_logps, torch.tensor([-3.0, -3.0]), torch.tensor([-2.0, -2.0]), labels, beta=0.5)
    assert torch.equal(same, torch.full((2,), 0.5))


def test_kto_pushes_desirable_up_and_undesirable_down():
    from lit_rlhf.losses import kto

    logps = torch.tensor([-2.0, -2.0], requires_grad=True)
    kto(logps, torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]), torch.tensor([True, False]), beta=0.1).sum().backward()
    assert logps.grad[0] < 0 < logps.grad[1]
