"""Token log-prob math."""

import torch

from lit_rlhf.data import IGNORE_INDEX
from lit_rlhf.ops import completion_logps, selective_log_softmax


def test_selective_log_softmax_matches_log_softmax_gather():
    logits, index = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, index[..., None]).squeeze(-1)
    assert torch.allclose(selective_log_softmax(logits, index), expected, atol=1e-6)


def test_completion_logps_by_hand():
    # vocab of 2, uniform logits except one position: log p = log 1/2 everywhere but there
    logits = torch.zeros(1, 4, 2)
    logits[0, 2] = torch.tensor([0.0, torch.log(torch.tensor(3.0))])  # p(token 1 at t=3) = 3/4
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 0, 1]])  # completion = tokens 2 and 3
    expected = torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.75))
    assert torch.isclose(completion_logps(logits, labels), expected.unsqueeze(0)).all()


def test_prompt_and_padding_positions_get_no_gradient():
    logits = torch.randn(2, 6, 7, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 3, 4, 5]])
    completion_logps(logits, labels).sum().backward()
    predicts_completion = torch.zeros(2, 6, dtype=torch.bool)
    predicts_completion[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # logits at t score the token at t + 1
    assert (logits.grad[~predicts_completion] == 0).all()
    assert (logits.grad[predicts_completion].abs().sum(-1) > 0).all()
