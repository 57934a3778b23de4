"""The policy losses of the RL update (PPO, GSPO, CISPO), clip-higher and the loss aggregations against values worked
out by hand; truncated responses masked out of the module's loss; `kl_coef 0` loads no reference."""

import math
from dataclasses import replace

import pytest
import torch

from lit_rlhf.errors import UserError
from lit_rlhf.forward import response_logps_and_entropies
from lit_rlhf.policy_losses import POLICY_LOSSES, aggregate_token_losses, checked_policy_loss, cispo, gspo, ppo_policy_loss
from lit_rlhf.ppo import PPOModule
from conftest import first_prompt_batch


def policy_loss(function, logprobs, old_logprobs, advantages, mask, aggregation="token_mean", length=1, **flags):
    """What the module does with a policy loss: call it, aggregate its per-token losses over the mask."""
    losses, stats = function(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask, **flags)
    return aggregate_token_losses(losses, mask, aggregation, length), stats


SYMMETRIC = {"cliprange_low": 0.2, "cliprange_high": 0.2}


def test_ppo_policy_loss_at_ratio_one():
    logprobs = torch.tensor([[-1.0, -2.0]])
    loss, stats = policy_loss(ppo_policy_loss, logprobs, logprobs, torch.tensor([[2.0, -1.0]]), torch.ones(1, 2))
    assert torch.isclose(loss, torch.tensor(-0.5))  # mean(-A)
    assert stats["ratio"] == 1.0 and stats["clipfrac"] == 0.0 and stats["approxkl"] == 0.0


def test_ppo_policy_loss_at_the_clip_edges():
    # ratios 1.5, 1.5, 0.5, 0.5 with advantages +1, -1, +1, -1 and cliprange 0.2:
    # max(-A r, -A clip(r)) = max(-1.5, -1.2), max(1.5, 1.2), max(-0.5, -0.8), max(0.5, 0.8)
    #                       = -1.2 (clipped), 1.5, -0.5, 0.8 (clipped)
    old = torch.zeros(1, 4)
    logprobs = torch.log(torch.tensor([[1.5, 1.5, 0.5, 0.5]])).requires_grad_()
    advantages = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, stats = policy_loss(ppo_policy_loss, logprobs, old, advantages, torch.ones(1, 4), **SYMMETRIC)
    assert torch.isclose(loss, torch.tensor((-1.2 + 1.5 - 0.5 + 0.8) / 4))
    assert stats["clipfrac"] == 0.5
    loss.backward()
    assert logprobs.grad[0, 0] == 0 and logprobs.grad[0, 3] == 0  # clipped terms pass no gradient
    assert torch.isclose(logprobs.grad[0, 1], torch.tensor(1.5 / 4))  # d(-A r)/d log r = -A r, A = -1


def test_clip_higher_lets_a_positive_advantage_rise_further():
    # ratio 1.25, A = +1: symmetric 0.2 clips it at 1.2 (loss -1.2, no gradient); DAPO's high side 0.28 does
    # not (loss -1.25, gradient -A r = -1.25). Ratio 0.75, A = -1: the low side 0.2 clips it at 0.8 either way
    # (max(0.75, 0.8) = 0.8, no gradient).
    old = torch.zeros(1, 2)
    advantages, mask = torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    for cliprange_high, expected, clipfrac, gradient in ((0.2, -1.2, 1.0, 0.0), (0.28, -1.25, 0.5, -1.25)):
        logprobs = torch.log(torch.tensor([[1.25, 0.75]])).requires_grad_()
        loss, stats = policy_loss(ppo_policy_loss, logprobs, old, advantages, mask, cliprange_low=0.2, cliprange_high=cliprange_high)
        assert torch.isclose(loss, torch.tensor((expected + 0.8) / 2)) and stats["clipfrac"] == clipfrac
        loss.backward()
        assert torch.allclose(logprobs.grad, torch.tensor([[gradient / 2, 0.0]]))


def test_gspo_clips_one_length_normalised_ratio_per_response():
    # row 0: 3 tokens, log ratios 0.3, -0.1, 0.1 -> mean 0.1 -> s_0 = e^0.1 = 1.105171, inside [0.8, 1.2]: loss -A s_0 = -1.105171
    #        (token-level PPO would clip its first token, e^0.3 = 1.35)
    # row 1: 2 tokens (+ padding with log ratio 5, ignored), log ratios 0.9, -0.1 -> mean 0.4 -> s_1 = e^0.4 = 1.491825,
    #        clipped at 1.2: loss -1.2 and no gradient (token-level PPO would pass one through its second token, e^-0.1)
    # each loss on every token of its response; sequence_mean: (-1.105171 - 1.2) / 2 = -1.152585
    old = torch.zeros(2, 3)
    logprobs = torch.tensor([[0.3, -0.1, 0.1], [0.9, -0.1, 5.0]]).requires_grad_()
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    advantages = mask.clone()  # A = +1 on every response token (a group estimator's), 0 off the response
    loss, stats = policy_loss(gspo, logprobs, old, advantages, mask, "sequence_mean", **SYMMETRIC)
    assert torch.isclose(loss, torch.tensor(-1.152585), atol=1e-6)
    assert torch.isclose(stats["ratio"], torch.tensor((3 * 1.105171 + 2 * 1.491825) / 5), atol=1e-6)  # per token of the mask
    assert stats["clipfrac"] == 2 / 5  # row 1's two tokens
    assert torch.isclose(stats["approxkl"], torch.tensor(0.5 * (0.09 + 0.01 + 0.01 + 0.81 + 0.01) / 5))  # of the token ratios
    loss.backward()
    # d/d logprob_0t of 1/2 * (-s_0) = -s_0 / (2 * 3) = -0.184195 on each of row 0's tokens; row 1 clipped: 0
    assert torch.allclose(logprobs.grad, torch.tensor([[-0.184195] * 3, [0.0] * 3]), atol=1e-6)
    token_level, _ = policy_loss(ppo_policy_loss, logprobs, old, advantages, mask, "sequence_mean", **SYMMETRIC)
    assert not torch.isclose(token_level, loss)  # the sequence ratio is not PPO's


def test_gspo_uses_each_responses_mean_advantage():
    # ratio 1: s = 1, loss -mean(A) per response; advantages 1, 3 on row 0 -> -2 on both of its tokens
    logprobs, mask = torch.zeros(1, 2), torch.ones(1, 2)
    losses, _ = gspo(logprobs, logprobs, torch.tensor([[1.0, 3.0]]), mask, **SYMMETRIC)
    assert torch.equal(losses, torch.tensor([[-2.0, -2.0]]))


def test_cispo_keeps_the_gradient_of_a_clipped_token():
    # token 0: ratio 1.5 (0.3 / 0.2), A = +1: PPO clips it (gradient 0); CISPO weights it by sg(clip(1.5)) = 1.2,
    #          loss -1.2 log pi, gradient -1.2
    # token 1: ratio 1.1 (0.22 / 0.2), A = +1, inside the range: both -A r = -1.1
    # token_mean over 2 tokens halves each gradient
    old = torch.log(torch.tensor([[0.2, 0.2]]))
    advantages, mask = torch.ones(1, 2), torch.ones(1, 2)
    gradients = {}
    for function in (ppo_policy_loss, cispo):
        logprobs = torch.log(torch.tensor([[0.3, 0.22]])).requires_grad_()
        loss, stats = policy_loss(function, logprobs, old, advantages, mask, **SYMMETRIC)
        loss.backward()
        gradients[function.__name__] = logprobs.grad
        assert stats["clipfrac"] == 0.5 and torch.isclose(stats["ratio"], torch.tensor((1.5 + 1.1) / 2))
    assert torch.allclose(gradients["ppo_policy_loss"], torch.tensor([[0.0, -1.1 / 2]]))
    assert torch.allclose(gradients["cispo"], torch.tensor([[-1.2 / 2, -1.1 / 2]]))
    # its value: -1.2 * 1 * ln 0.3 and -1.1 * ln 0.22, not PPO's
    loss, _ = policy_loss(cispo, torch.log(torch.tensor([[0.3, 0.22]])), old, advantages, mask, **SYMMETRIC)
    assert torch.isclose(loss, torch.tensor((-1.2 * math.log(0.3) - 1.1 * math.log(0.22)) / 2))


@pytest.mark.parametrize("name", list(POLICY_LOSSES))
def test_every_policy_loss_weights_each_token(name):
    # ratio 1, advantages 1 and -2 on one response, weights 0.5 and 2: PPO's token losses -0.5 and 4 (token mean 1.75).
    # GSPO: the response's mean advantage -0.5 -> losses 0.25, 1 -> 0.625. PPO's and CISPO's gradients are -A w / 2 per
    # token; GSPO's loss 1/2 sum_t (-A s w_t) moves with s = exp(mean_t log r_t), ds / dlog pi_j = s / 2, so each token
    # gets 1/2 * 0.5 * (0.5 + 2) * 1/2 = 0.3125
    function = POLICY_LOSSES[name][0]
    logprobs = torch.zeros(1, 2, requires_grad=True)
    advantages, mask, weights = torch.tensor([[1.0, -2.0]]), torch.ones(1, 2), torch.tensor([[0.5, 2.0]])
    loss, _ = policy_loss(function, logprobs, logprobs.detach(), advantages, mask, weights=weights, **SYMMETRIC)
    if name != "cispo":  # CISPO's value holds log pi = 0 here
        assert loss == {"ppo": 1.75, "gspo": 0.625}[name]
    loss.backward()
    expected = [[0.3125, 0.3125]] if name == "gspo" else [[-0.5 / 2, 2 * 2 / 2]]
    assert torch.allclose(logprobs.grad, torch.tensor(expected))


def test_token_loss_aggregations_by_hand():
    # a response of 3 tokens (losses 1, 2, 3) and one of 1 token (loss 4), padding holds 9 (must not count)
    losses, mask = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]]), torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert aggregate_token_losses(losses, mask, "token_mean") == (1 + 2 + 3 + 4) / 4  # 2.5: every token alike
    assert aggregate_token_losses(losses, mask, "sequence_mean") == ((1 + 2 + 3) / 3 + 4 / 1) / 2  # 3.0: every response alike
    assert aggregate_token_losses(losses, mask, "constant", length=4) == ((1 + 2 + 3) / 4 + 4 / 4) / 2  # 1.25: sums over 4
    with pytest.raises(ValueError, match="unknown loss aggregation 'sum'"):
        aggregate_token_losses(losses, mask, "sum")


def test_a_masked_out_response_adds_nothing_and_an_empty_mask_gives_zero():
    # row 1 masked out (a truncated response): token_mean (1 + 2 + 3) / 3; sequence_mean (2 + 0) / 2, the row still counts
    losses, mask = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    assert aggregate_token_losses(losses, mask, "token_mean") == 2.0
    assert aggregate_token_losses(losses, mask, "sequence_mean") == 1.0
    assert aggregate_token_losses(losses, mask, "constant", length=3) == (6 / 3 + 0) / 2
    for aggregation in ("token_mean", "sequence_mean", "constant"):
        assert aggregate_token_losses(losses, torch.zeros(2, 3), aggregation) == 0.0  # not nan: every response truncated


def test_a_policy_loss_plugin_is_checked_against_the_contract():
    shape = torch.Size([2, 3])
    losses, stats = checked_policy_loss((torch.zeros(2, 3), {"ratio": torch.tensor(1.0)}), "mine.py:f", shape)
    assert losses.shape == shape and stats["ratio"] == 1.0
    with pytest.raises(UserError, match=r"--model.policy_loss mine.py:f returned a Tensor of shape \(2,\) where it must return"
                                        r" the \(B, T\) per-token losses first, here of shape \(2, 3\)"):  # fmt: skip
        checked_policy_loss((torch.zeros(2), {}), "mine.py:f", shape)
    with pytest.raises(UserError, match=r"--model.policy_loss mine.py:f returned a Tensor where it must return \(losses, stats\)"):
        checked_policy_loss(torch.zeros(2, 3), "mine.py:f", shape)


def test_a_policy_loss_plugin_with_an_unknown_argument_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_losses.py").write_text("def needs_values(logprobs, values):\n    return -logprobs, {}\n")
    with pytest.raises(UserError, match=r"--model.policy_loss: needs_values\(logprobs, values\) requires values, which is not provided;"
                                        r" a policy loss is called with any of the keyword arguments logprobs, old_logprobs, advantages,"
                                        r" mask, cliprange_low, cliprange_high, weights"):  # fmt: skip
        PPOModule(reward_model_path="unused", model_name_or_path="unused", policy_loss="my_losses.py:needs_values")
    with pytest.raises(UserError, match="--model.policy_loss clipped: not one of ppo, gspo, cispo"):
        PPOModule(reward_model_path="unused", model_name_or_path="unused", policy_loss="clipped")


def test_help_names_every_policy_loss_with_its_paper():
    doc = PPOModule.__init__.__doc__
    assert all(f"`{name}` ({paper})" in doc for name, (_, paper) in POLICY_LOSSES.items())
    assert "POLICY_LOSS" not in doc and "logprobs, old_logprobs, advantages, mask, cliprange_low, cliprange_high, weights" in doc


# ---- in the module: a tiny model ------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompt_batch(tiny_model_dir, real_rows):
    return first_prompt_batch(tiny_model_dir, real_rows, batch_size=4)


def test_kl_coef_0_loads_and_scores_no_reference(tiny_model_dir, tiny_reward_dir, prompt_batch):
    counts = {}
    for kl_coef in (0.05, 0.0):
        module = PPOModule(reward_model_path=tiny_reward_dir, model_name_or_path=tiny_model_dir, response_length=4, kl_coef=kl_coef,
                           advantage_estimator="rloo", num_generations=2)  # fmt: skip
        counts[kl_coef] = {prefix: sum(p.numel() for n, p in module.named_parameters() if n.startswith(prefix + "."))
                           for prefix in ("model", "ref_model", "reward_model")}  # fmt: skip
        rollout = module.compute_advantages(module.rollout(prompt_batch))
        assert (rollout.ref_logprobs is None) == (rollout.kl is None) == (kl_coef == 0)
    assert counts[0.05]["ref_model"] == counts[0.05]["model"] > 0  # a full copy of the policy
    assert counts[0.0]["ref_model"] == 0 and counts[0.0]["model"] == counts[0.05]["model"]
    assert torch.equal(rollout.non_score_reward, torch.zeros_like(rollout.response_mask))


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_mask_truncated_completions_leaves_responses_without_eos_out_of_the_loss(tiny_model_dir, tiny_reward_dir, prompt_batch, aggregation):
    """Rows 0 and 3 end without EOS: with the flag, whatever their advantages, the loss and the gradient are the same;
    without it they are not."""
    torch.manual_seed(0)
    modules = {
        masked: PPOModule(reward_model_path=tiny_reward_dir, model_name_or_path=tiny_model_dir, response_length=4, loss_aggregation=aggregation,
                          advantage_estimator="rloo", num_generations=2, mask_truncated_completions=masked)  # fmt: skip
        for masked in (True, False)
    }
    rollout = modules[True].compute_advantages(modules[True].rollout(prompt_batch))
    contains_eos = torch.tensor([False, True, True, False, True, True, True, True])
    rollout = replace(rollout, contains_eos=contains_eos)
    shifted = replace(rollout, advantages=rollout.advantages + 100.0 * (~contains_eos)[:, None] * rollout.response_mask)
    rows = torch.arange(8)
    for masked, module in modules.items():
        results = []
        for r in (rollout, shifted):
            module.model.zero_grad()
            loss, stats = module.micro_batch_loss(r, rows)
            loss.backward()
            results.append((loss.detach(), torch.cat([p.grad.flatten() for p in module.model.parameters()])))
        (loss, gradient), (shifted_loss, shifted_gradient) = results
        same = torch.isclose(loss, shifted_loss) and torch.allclose(gradient, shifted_gradient, atol=1e-6)
        assert same == masked, (masked, loss, shifted_loss)


@pytest.mark.parametrize("kl_loss_estimator, per_token", [("k3", math.exp(-1)), ("k2", 0.5), ("low_var_kl", math.exp(-1)), ("k1", 1.0)])
def test_the_kl_loss_uses_its_own_estimator(tiny_model_dir, tiny_reward_dir, prompt_batch, kl_loss_estimator, per_token):
    """On-policy, advantages 0 (the policy loss is 0) and a reference 1 nat per token below the policy (log r = 1): the
    loss is kl_coef times the estimator at log r = 1, in any aggregation: k3 = e^-1 - 1 + 1, k2 = 0.5, k1 = 1."""
    module = PPOModule(reward_model_path=tiny_reward_dir, model_name_or_path=tiny_model_dir, response_length=4, kl_coef=0.1,
                       advantage_estimator="grpo", num_generations=2, kl_loss_estimator=kl_loss_estimator)  # fmt: skip
    torch.manual_seed(0)
    rollout = module.compute_advantages(module.rollout(prompt_batch))
    rollout = replace(rollout, ref_logprobs=rollout.logprobs - rollout.response_mask, advantages=torch.zeros_like(rollout.advantages))
    loss, _ = module.micro_batch_loss(rollout, torch.arange(8))
    assert module.kl_in_loss and loss.item() == pytest.approx(0.1 * per_token, abs=1e-5)


def test_an_unknown_kl_estimator_is_refused_naming_the_flag(tiny_model_dir, tiny_reward_dir):
    with pytest.raises(UserError, match="--model.kl_loss_estimator k4: not one of k1, k2, k3, low_var_kl"):
        PPOModule(reward_model_path=tiny_reward_dir, model_name_or_path=tiny_model_dir, kl_loss_estimator="k4")


def test_the_entropy_bonus_pushes_the_policy_towards_higher_entropy(tiny_model_dir, tiny_reward_dir, prompt_batch):
    """Advantages 0 and no KL: the policy loss and its gradient are 0, so the loss is -entropy_coef times the mean entropy
    of the rollout (on-policy: the rollout's entropies), and a small step down its gradient raises the entropy;
    with entropy_coef 0 the gradient is 0."""
    torch.manual_seed(0)
    module = PPOModule(reward_model_path=tiny_reward_dir, model_name_or_path=tiny_model_dir, response_length=4, kl_coef=0.0,
                       advantage_estimator="rloo", num_generations=2, entropy_coef=0.5)  # fmt: skip
    rollout = module.compute_advantages(module.rollout(prompt_batch))
    rollout = replace(rollout, advantages=torch.zeros_like(rollout.advantages))
    rows, mask = torch.arange(8), rollout.response_mask
    entropy = (rollout.entropies * mask).sum() / mask.sum()  # token_mean, rloo's aggregation
    loss, stats = module.micro_batch_loss(rollout, rows)
    assert loss.item() == pytest.approx(-0.5 * entropy.item(), abs=1e-5) and stats["policy/entropy_avg"] == pytest.approx(entropy.item(), abs=1e-5)
    loss.backward()
    with torch.no_grad():
        for parameter in module.model.parameters():
            parameter -= 1e-2 * parameter.grad
    after = response_logps_and_entropies(module.model, rollout.model_inputs(rows), rollout.context_length, module.hparams.temperature)[..., 1]
    assert (after * mask).sum() / mask.sum() > entropy + 1e-4
    module.hparams.entropy_coef = 0.0
    module.model.zero_grad()
    loss, stats = module.micro_batch_loss(rollout, rows)
    loss.backward()
    assert loss.item() == 0.0 and "policy/entropy_avg" not in stats
    assert all(p.grad is None or not p.grad.any() for p in module.model.parameters())
