"""Token log-prob math, masks, advantages and the learning-rate schedule, checked by hand."""

import math
import subprocess
import sys

import pytest
import torch

from lit_rlhf.ops import (
    IGNORE_INDEX,
    gae,
    kl_penalty,
    label_logps,
    last_token_index,
    linear_warmup_decay,
    masked_whiten,
    position_ids,
    truncate_after_eos,
)


def completion_logps(logits, labels):
    return label_logps(logits, labels).sum(-1)


@pytest.mark.parametrize("chunk_tokens", [1, 3, 512])
def test_label_logps_through_a_head_in_chunks_equal_log_softmax_of_the_full_logits(chunk_tokens):
    # the reference computation: the full (B, T, V) logits, log_softmax, gather
    torch.manual_seed(0)
    hidden = torch.randn(3, 6, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=False)
    labels = torch.tensor([[IGNORE_INDEX] * 2 + [1, 2, 3, 4], [IGNORE_INDEX] * 4 + [5, 6], [IGNORE_INDEX, 7, 8, 9, 10, IGNORE_INDEX]])
    full = torch.log_softmax(head(hidden)[:, :-1] / 0.7, -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    expected = full * (labels[:, 1:] != IGNORE_INDEX)
    (grad_hidden, grad_head) = torch.autograd.grad(expected.sum(), (hidden, head.weight))
    chunked = label_logps(hidden, labels, 0.7, head=head, chunk_tokens=chunk_tokens)
    assert torch.allclose(chunked, expected, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(torch.autograd.grad(chunked.sum(), (hidden, head.weight)), (grad_hidden, grad_head)))


def test_completion_logps_by_hand():
    # vocab of 2, uniform logits except one position: log p = log 1/2 everywhere but there
    logits = torch.zeros(1, 4, 2)
    logits[0, 2] = torch.tensor([0.0, torch.log(torch.tensor(3.0))])  # p(token 1 at t=3) = 3/4
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 0, 1]])  # completion = tokens 2 and 3
    expected = torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.75))
    assert torch.isclose(completion_logps(logits, labels), expected.unsqueeze(0)).all()


def test_label_logps_per_token_and_at_a_temperature_by_hand():
    # vocab 2; at t=1 the logits are (0, log 3): p(1) = 3/4, and at temperature 2, p(1) = sqrt 3 / (1 + sqrt 3)
    logits = torch.zeros(2, 3, 2)
    logits[:, 1, 1] = math.log(3.0)
    labels = torch.tensor([[IGNORE_INDEX, 0, 1], [IGNORE_INDEX, IGNORE_INDEX, 1]])
    assert torch.allclose(label_logps(logits, labels), torch.tensor([[math.log(0.5), math.log(0.75)], [0.0, math.log(0.75)]]))
    hot = math.log(math.sqrt(3) / (1 + math.sqrt(3)))
    assert torch.allclose(label_logps(logits, labels, temperature=2.0), torch.tensor([[math.log(0.5), hot], [0.0, hot]]))


def test_prompt_and_padding_positions_get_no_gradient():
    logits = torch.randn(2, 6, 7, requires_grad=True)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 3, 4, 5]])
    completion_logps(logits, labels).sum().backward()
    predicts_completion = torch.zeros(2, 6, dtype=torch.bool)
    predicts_completion[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # logits at t score the token at t + 1
    assert (logits.grad[~predicts_completion] == 0).all()
    assert (logits.grad[predicts_completion].abs().sum(-1) > 0).all()


def test_gae_by_hand():
    # gamma 0.9, lam 0.95: A1 = 2 - 1 = 1; A0 = (1 + 0.9 * 1 - 0.5) + 0.9 * 0.95 * 1 = 2.255
    advantages, returns = gae(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 1.0]]), torch.ones(1, 2), gamma=0.9, lam=0.95)
    assert torch.allclose(advantages, torch.tensor([[2.255, 1.0]]))
    assert torch.allclose(returns, torch.tensor([[2.755, 2.0]]))


def test_gae_stops_at_the_last_real_token():
    # mask cuts position 2 (its value 9 must not leak back); gamma 1, lam 0.5:
    # A1 = 1 + 0 - 0.5 = 0.5; A0 = (0 + 0.5 - 0.5) + 0.5 * 0.5 = 0.25
    advantages, returns = gae(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.5, 0.5, 9.0]]), torch.tensor([[1.0, 1.0, 0.0]]), gamma=1.0, lam=0.5)
    assert torch.allclose(advantages, torch.tensor([[0.25, 0.5, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[0.75, 1.0, 0.0]]))


def test_masked_whiten_by_hand():
    # masked values 1, 2, 3: mean 2, unbiased variance (1 + 0 + 1) / 2 = 1
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert torch.allclose(masked_whiten(x, mask)[:, :3], torch.tensor([[-1.0, 0.0, 1.0]]), atol=1e-6)
    assert torch.allclose(masked_whiten(x, mask, shift_mean=False)[:, :3], torch.tensor([[1.0, 2.0, 3.0]]), atol=1e-6)


def test_kl_estimators_by_hand():
    logprobs, ref_logprobs = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-2.0, -1.0]])
    assert torch.allclose(kl_penalty(logprobs, ref_logprobs, "k1"), torch.tensor([[1.0, -1.0]]))
    # k3 = r - 1 - log r with r = q / p: e^-1 - 1 + 1 = 0.367879; e - 1 - 1 = 0.718282
    assert torch.allclose(kl_penalty(logprobs, ref_logprobs, "k3"), torch.tensor([[0.367879, 0.718282]]), atol=1e-6)
    assert torch.equal(kl_penalty(logprobs, logprobs, "k3"), torch.zeros(1, 2))


def test_truncate_after_first_eos():
    EOS = PAD = 9
    responses = torch.tensor([[5, EOS, 7, EOS], [5, 6, 7, 8], [EOS, 1, 2, 3]])
    cut, mask, contains_eos = truncate_after_eos(responses, eos_id=EOS, pad_id=PAD)
    assert cut.tolist() == [[5, EOS, PAD, PAD], [5, 6, 7, 8], [EOS, PAD, PAD, PAD]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert contains_eos.tolist() == [True, False, True]


def test_position_ids_start_at_the_first_real_token():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_last_token_index_any_padding_side():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


@pytest.mark.parametrize(
    "warmup, total, expected",
    [
        (2, 6, [0.5, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]),  # warm up over steps 0-1, then 4 steps down to 0 at step 6
        (0, 4, [1.0, 0.75, 0.5, 0.25, 0.0]),  # no warmup: decay from the first step
        (3, 2, [1 / 3, 2 / 3, 1.0, 0.0]),  # warmup longer than the run: no negative rate after it
    ],
)
def test_linear_warmup_decay_by_hand(warmup, total, expected):
    assert [linear_warmup_decay(step, warmup, total) for step in range(len(expected))] == pytest.approx(expected)


def test_pure_math_modules_import_torch_alone():
    code = "import sys, lit_rlhf.ops, lit_rlhf.losses; print(sorted({'transformers', 'lightning', 'lit_rlhf.data'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
