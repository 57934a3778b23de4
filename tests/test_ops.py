"""Token log-prob math, masks, advantages and the learning-rate schedule, checked by hand."""

import math
import subprocess
import sys

import pytest
import torch

from lit_rlhf.estimators import reinforce_pp, rloo
from lit_rlhf.ops import (
    IGNORE_INDEX,
    gae,
    group_minibatches,
    grouped_query_attention,
    grpo_advantages,
    kl_estimate,
    label_logps,
    label_logps_and_entropies,
    last_token_index,
    linear_warmup_constant,
    linear_warmup_decay,
    masked_whiten,
    position_ids,
    rloo_advantages,
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


def test_gae_skips_the_observation_tokens_between_two_policy_turns():
    """Two policy turns [0, 1] and [4], an observation [2, 3] between them (its values 7, 8 and reward 5 never read),
    padding at 5. gamma 0.9, lam 0.5, score 1 on the last policy token:
    A4 = 1 - 0.5 = 0.5; A1 = 0 + 0.9 * V4 - V1 + 0.9 * 0.5 * A4 = 0.45 - 0.25 + 0.225 = 0.425 (the next token of the
    recursion is 4, not 2); A0 = 0 + 0.9 * 0.25 - 1 + 0.45 * 0.425 = -0.58375."""
    rewards, values = torch.tensor([[0.0, 0.0, 5.0, 0.0, 1.0, 0.0]]), torch.tensor([[1.0, 0.25, 7.0, 8.0, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert torch.allclose(advantages, torch.tensor([[-0.58375, 0.425, 0.0, 0.0, 0.5, 0.0]]))
    assert torch.allclose(returns, torch.tensor([[0.41625, 0.675, 0.0, 0.0, 1.0, 0.0]]))
    # the same as GAE over the policy's tokens alone, the observation cut out
    alone, _ = gae(rewards[:, [0, 1, 4]], values[:, [0, 1, 4]], torch.ones(1, 3), gamma=0.9, lam=0.5)
    assert torch.allclose(advantages[:, [0, 1, 4]], alone)


def test_masked_whiten_by_hand():
    # masked values 1, 2, 3: mean 2, unbiased variance (1 + 0 + 1) / 2 = 1
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert torch.allclose(masked_whiten(x, mask)[:, :3], torch.tensor([[-1.0, 0.0, 1.0]]), atol=1e-6)
    assert torch.allclose(masked_whiten(x, mask, shift_mean=False)[:, :3], torch.tensor([[1.0, 2.0, 3.0]]), atol=1e-6)


@pytest.mark.parametrize("chunk_tokens", [1, 512])
def test_entropies_by_hand_on_a_two_token_vocabulary(chunk_tokens):
    """Logits (0, 0): p = (1/2, 1/2), H = ln 2; logits (0, ln 3): p = (1/4, 3/4), H = 1/4 ln 4 + 3/4 ln(4/3) = 0.562335;
    at temperature 2 the second is (0, ln 3 / 2): p = (1, sqrt 3) / (1 + sqrt 3), H = 0.656806."""
    logits = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)], [5.0, -5.0]]])  # (1, 3, 2); the last position predicts nothing
    labels = torch.tensor([[IGNORE_INDEX, 0, 1]])
    logps, entropies = label_logps_and_entropies(logits, labels, chunk_tokens=chunk_tokens)
    assert torch.allclose(logps, torch.tensor([[math.log(0.5), math.log(0.75)]]))
    assert torch.equal(logps, label_logps(logits, labels))  # the same log-probs, bit for bit
    assert torch.allclose(entropies, torch.tensor([[math.log(2), 0.562335]]), atol=1e-6)
    _, hot = label_logps_and_entropies(logits, labels, temperature=2.0, chunk_tokens=chunk_tokens)
    assert torch.allclose(hot, torch.tensor([[math.log(2), 0.656806]]), atol=1e-6)
    _, masked = label_logps_and_entropies(logits, torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 1]]), chunk_tokens=chunk_tokens)
    assert masked[0, 0] == 0.0 and masked[0, 1] == pytest.approx(0.562335, abs=1e-6)


def test_entropies_through_a_head_in_chunks_keep_their_gradient():
    """A head on hidden states, 1 position per chunk (recomputed in the backward): values and gradients equal those of
    the full logits' entropy."""
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 5, bias=False)
    hidden = torch.randn(2, 4, 4)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, 4, 0]])
    _, entropies = label_logps_and_entropies(hidden, labels, head=head, chunk_tokens=1)
    chunked = torch.autograd.grad(entropies.sum(), head.weight)[0]
    logps = head(hidden[:, :-1]).log_softmax(-1)  # (2, 3, 5)
    full = -(logps.exp() * logps).sum(-1) * (labels[:, 1:] != IGNORE_INDEX)
    assert torch.allclose(entropies, full, atol=1e-6)
    assert torch.allclose(chunked, torch.autograd.grad(full.sum(), head.weight)[0], atol=1e-6)


def test_kl_estimators_by_hand():
    logprobs, ref_logprobs = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-2.0, -1.0]])
    assert torch.allclose(kl_estimate(logprobs, ref_logprobs, "k1"), torch.tensor([[1.0, -1.0]]))
    # k3 = r - 1 - log r with r = q / p: e^-1 - 1 + 1 = 0.367879; e - 1 - 1 = 0.718282
    assert torch.allclose(kl_estimate(logprobs, ref_logprobs, "k3"), torch.tensor([[0.367879, 0.718282]]), atol=1e-6)
    assert torch.equal(kl_estimate(logprobs, logprobs, "k3"), torch.zeros(1, 2))
    # k2 = 0.5 (log r)^2: 0.5 and 0.5
    assert torch.allclose(kl_estimate(logprobs, ref_logprobs, "k2"), torch.tensor([[0.5, 0.5]]))


def test_low_var_kl_is_k3_clamped_to_10_as_verl_computes_it():
    # log r = 1, -1 (k3 as above), 30 (k3 = e^-30 + 29 ~ 29 -> 10), -30 (k3 = e^30 - 31 -> 10), -1000 (e^1000 overflows:
    # the log-ratio is clamped to [-20, 20] first, so the value is 10 and the gradient 0, not nan)
    log_ratio = torch.tensor([[1.0, -1.0, 30.0, -30.0, -1000.0]], requires_grad=True)
    kl = kl_estimate(log_ratio, torch.zeros(1, 5), "low_var_kl")
    assert torch.allclose(kl, torch.tensor([[0.367879, 0.718282, 10.0, 10.0, 10.0]]), atol=1e-6)
    kl.sum().backward()
    # d k3 / d log r = 1 - e^-log r inside the clamps: 1 - e^-1 = 0.632121, 1 - e = -1.718282; 0 where clamped
    assert torch.allclose(log_ratio.grad, torch.tensor([[0.632121, -1.718282, 0.0, 0.0, 0.0]]), atol=1e-6)


def test_an_unknown_kl_estimator_names_the_known_ones():
    with pytest.raises(ValueError, match="k1, k2, k3, low_var_kl"):
        kl_estimate(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


def test_rloo_advantages_by_hand():
    # k = 2, groups (1, 3) and a tie (5, 5): the baseline is the other sample: 1 - 3 = -2, 3 - 1 = 2; 0, 0
    assert rloo_advantages(torch.tensor([1.0, 3.0, 5.0, 5.0]), k=2).tolist() == [-2.0, 2.0, 0.0, 0.0]
    # k = 4, group (1, 2, 3, 6), sum 12: baselines (12 - r) / 3 = 11/3, 10/3, 3, 2 -> -8/3, -4/3, 0, 4
    assert torch.allclose(rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), k=4), torch.tensor([-8 / 3, -4 / 3, 0.0, 4.0]))
    # k = 4 with ties (2, 2, 5, 5), sum 14: baselines 12/3 = 4 and 9/3 = 3 -> -2, -2, 2, 2
    assert rloo_advantages(torch.tensor([2.0, 2.0, 5.0, 5.0]), k=4).tolist() == [-2.0, -2.0, 2.0, 2.0]


def test_grpo_and_dr_grpo_advantages_by_hand():
    # k = 2, group (1, 3): mean 2, unbiased std sqrt((1 + 1) / 1) = sqrt 2 -> -+1 / (sqrt 2 + eps)
    one_over_std = 1 / (math.sqrt(2) + 1e-4)
    assert torch.allclose(grpo_advantages(torch.tensor([1.0, 3.0]), k=2), torch.tensor([-one_over_std, one_over_std]))
    # k = 4, group (1, 2, 3, 6): mean 3, deviations -2, -1, 0, 3, unbiased variance (4 + 1 + 0 + 9) / 3 = 14/3
    scores, deviations = torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([-2.0, -1.0, 0.0, 3.0])
    assert torch.allclose(grpo_advantages(scores, k=4), deviations / (math.sqrt(14 / 3) + 1e-4))
    assert grpo_advantages(scores, k=4, scale_by_std=False).tolist() == deviations.tolist()  # Dr. GRPO: no division
    # k = 2 over two groups, one with a tie (4, 4): std 0, so 0 / (0 + eps) = 0
    assert torch.allclose(grpo_advantages(torch.tensor([1.0, 3.0, 4.0, 4.0]), k=2), torch.tensor([-one_over_std, one_over_std, 0.0, 0.0]))


def test_a_group_whose_scores_are_all_equal_gets_zero_advantage_and_no_nan():
    scores = torch.full((4,), 0.5)
    for advantages in (rloo_advantages(scores, 4), grpo_advantages(scores, 4), grpo_advantages(scores, 4, scale_by_std=False)):
        assert torch.equal(advantages, torch.zeros(4))


@pytest.mark.parametrize("estimator, name", [(rloo_advantages, "RLOO"), (grpo_advantages, "GRPO")])
def test_group_advantages_refuse_one_sample_per_prompt_and_ragged_groups(estimator, name):
    with pytest.raises(ValueError, match=f"{name} compares the samples of one prompt: it needs k >= 2 samples per prompt, got k=1"):
        estimator(torch.tensor([1.0, 2.0]), 1)
    with pytest.raises(ValueError, match="5 scores do not split into groups of k=2"):
        estimator(torch.arange(5.0), 2)


def test_group_estimators_credit_each_response_its_score_plus_summed_kl_penalty():
    # two prompts x 2 responses; per-token rewards: KL penalties, the score on the last real token
    rewards = torch.tensor([[-0.1, 1.0, 0.0], [0.0, -0.2, 3.0], [2.0, 7.0, 7.0], [0.5, 1.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    # response rewards 0.9, 2.8 | 2.0, 2.0 (padding ignored): RLOO advantages -1.9, 1.9 | 0, 0 on every real token
    advantages, returns = rloo(rewards, mask, k=2)
    assert torch.allclose(advantages, torch.tensor([-1.9, 1.9, 0.0, 0.0])[:, None] * mask) and returns is None


def test_reinforce_pp_advantages_by_hand():
    # row 0: rewards -0.1, -0.2, 1.0 -> returns (sums of future rewards) 0.7, 0.8, 1.0
    # row 1: one real token, reward 0.5 -> return 0.5; its padding holds 9s, which must not count
    rewards = torch.tensor([[-0.1, -0.2, 1.0], [0.5, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    # returns 0.7, 0.8, 1.0, 0.5: mean 0.75, deviations -0.05, 0.05, 0.25, -0.25,
    # unbiased variance (0.0025 + 0.0025 + 0.0625 + 0.0625) / 3 = 0.13 / 3, std 0.2081666
    std = math.sqrt(0.13 / 3)
    expected = torch.tensor([[-0.05 / std, 0.05 / std, 0.25 / std], [-0.25 / std, 0.0, 0.0]])
    advantages, returns = reinforce_pp(rewards, mask, sum_over_processes=lambda t: t)
    assert torch.allclose(advantages, expected, atol=1e-5) and returns is None


def test_group_minibatches_hold_whole_groups():
    torch.manual_seed(0)
    draws = [group_minibatches(12, 3, 2) for _ in range(5)]  # 4 groups of 3 into 2 minibatches
    for minibatches in draws:
        assert [len(m) for m in minibatches] == [6, 6]
        assert sorted(torch.cat(minibatches).tolist()) == list(range(12))  # every row once
        for m in minibatches:  # each minibatch is 2 whole groups: rows 3g, 3g + 1, 3g + 2 together
            assert sorted(m.tolist()) == sorted(3 * g + i for g in set((m // 3).tolist()) for i in range(3))
            assert len(set((m // 3).tolist())) == 2
    assert len({tuple(draws[i][0].tolist()) for i in range(5)}) > 1  # the groups are shuffled
    # k = 1: the shuffled rows cut into equal parts, as PPO always did
    torch.manual_seed(1)
    expected = torch.randperm(8).split(4)
    torch.manual_seed(1)
    assert [m.tolist() for m in group_minibatches(8, 1, 2)] == [m.tolist() for m in expected]
    # a short last batch of an epoch: 1 group for 2 minibatches gives 1 minibatch, not an empty one
    assert [m.tolist() for m in group_minibatches(3, 3, 2)] == [[0, 1, 2]]
    with pytest.raises(ValueError, match="7 rows do not split into groups of k=3"):
        group_minibatches(7, 3, 2)


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


def attention_by_hand(query, key, value, allowed):
    """softmax(q . k / sqrt(D)) @ v in fp64, query head h reading key/value head h // (H / KV), over the positions
    `allowed` (B, q, T) bool. -> (B, H, q, D)"""
    B, H, q, D = query.shape
    group = H // key.shape[1]
    out = torch.zeros(B, H, q, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(q):
                scores = key[b, h // group].double() @ query[b, h, i].double() / math.sqrt(D)  # (T,)
                weights = scores.masked_fill(~allowed[b, i], -math.inf).softmax(-1)
                out[b, h, i] = weights @ value[b, h // group].double()
    return out


@pytest.mark.parametrize("q, padded", [(1, True), (1, False), (4, False)])
def test_grouped_query_attention_by_hand(q, padded):
    torch.manual_seed(0)
    B, H, KV, T, D = 3, 6, 2, 7, 8  # 3 query heads per key/value head
    query, key, value = torch.randn(B, H, q, D), torch.randn(B, KV, T, D), torch.randn(B, KV, T, D)
    allowed = torch.ones(B, q, T, dtype=torch.bool)
    if padded:  # a decoding step after left-padded prompts: each row's padding masked for every head
        allowed[0, :, :3], allowed[2, :, :1] = False, False
        out = grouped_query_attention(query, key, value, torch.zeros(B, 1, q, T).masked_fill(~allowed[:, None], -math.inf))
    elif q > 1:  # a prefill: causal over the q positions
        key, value, allowed = key[:, :, :q], value[:, :, :q], torch.ones(q, q, dtype=torch.bool).tril().expand(B, q, q)
        out = grouped_query_attention(query, key, value, is_causal=True)
    else:
        out = grouped_query_attention(query, key, value)
    assert out.shape == (B, H, q, D)
    torch.testing.assert_close(out.double(), attention_by_hand(query, key, value, allowed), atol=1e-5, rtol=1e-5)


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


def test_linear_warmup_constant_by_hand():
    assert [linear_warmup_constant(step, 2, 6) for step in range(7)] == pytest.approx([0.5, 1, 1, 1, 1, 1, 1])  # the peak to the end
    assert [linear_warmup_constant(step, 0, 4) for step in range(3)] == [1.0, 1.0, 1.0]


def test_pure_math_modules_import_torch_alone():
    code = "import sys, lit_rlhf.ops, lit_rlhf.losses; print(sorted({'transformers', 'lightning', 'lit_rlhf.data'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
