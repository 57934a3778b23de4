"""Reward read at the last real token, for either padding side and when pad == EOS."""

import pytest
import torch

from lit_rlhf import sequence_scores
from lit_rlhf.forward import hidden_states, model_inputs, token_values
from lit_rlhf.models import load_scalar_model


def head(model, ids):
    return token_values(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def test_score_is_read_at_last_real_token_even_when_it_is_the_pad_id(tiny_model_dir, tokenizer):
    model = load_scalar_model(tiny_model_dir, tokenizer.pad_token_id).eval()
    eos = tokenizer.eos_token_id  # == pad id
    ids = torch.tensor([[5, 6, 7, eos]])
    alone = head(model, ids)[0, -1]  # head at the real EOS
    right = torch.tensor([[5, 6, 7, eos, eos, eos]])
    left = torch.tensor([[eos, eos, 5, 6, 7, eos]])
    with torch.no_grad():
        mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
        scores = sequence_scores(model, {"input_ids": torch.cat([right, left]), "attention_mask": mask})
        before_eos = head(model, ids)[0, -2]
    assert torch.allclose(scores, alone.expand(2), atol=1e-5)
    # transformers' own pooling (last id != pad) would read the token before EOS: a different value
    assert not torch.isclose(alone, before_eos, atol=1e-4)


def test_a_right_padded_batch_runs_without_a_mask_and_its_tokens_see_no_padding(tiny_model_dir, tokenizer):
    """Causal attention alone keeps each real token from the padding after it: no mask, the same hidden states as each
    row alone, whatever the padding holds; a batch with padding before some row's tokens keeps its mask."""
    model = load_scalar_model(tiny_model_dir, tokenizer.pad_token_id).eval()
    rows = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    ids = torch.tensor([row + [99] * (5 - len(row)) for row in rows])  # right-padded with an ordinary token
    mask = torch.tensor([[1] * len(row) + [0] * (5 - len(row)) for row in rows])
    batch = {"input_ids": ids, "attention_mask": mask}
    assert model_inputs(batch)["attention_mask"] is None
    with torch.no_grad():
        _, batched = hidden_states(model, batch)
        for i, row in enumerate(rows):
            _, alone = hidden_states(model, {"input_ids": torch.tensor([row]), "attention_mask": torch.ones(1, len(row), dtype=torch.long)})
            assert torch.allclose(batched[i, : len(row)], alone[0], atol=1e-5)
    left = {"input_ids": ids, "attention_mask": mask.flip(1)}
    assert model_inputs(left)["attention_mask"] is left["attention_mask"]


def test_attn_implementation_reaches_every_model_of_the_run(tiny_model_dir, tiny_reward_dir):
    from lit_rlhf.dpo import DPOModule
    from lit_rlhf.ppo import PPOModule
    from lit_rlhf.reward import RewardModule

    modules = [RewardModule(model_name_or_path=tiny_model_dir, attn_implementation="eager"),
               DPOModule(model_name_or_path=tiny_model_dir, attn_implementation="eager"),
               PPOModule(model_name_or_path=tiny_model_dir, reward_model_path=tiny_reward_dir, attn_implementation="eager")]  # fmt: skip
    loaded = [m for module in modules for m in (module.model, getattr(module, "ref_model", None), getattr(module, "reward_model", None),
                                                getattr(module, "value_model", None)) if m is not None]  # fmt: skip
    assert len(loaded) == 7  # reward model; DPO policy and reference; PPO policy, reference, reward and value models
    assert {m.config._attn_implementation for m in loaded} == {"eager"}
    assert PPOModule(model_name_or_path=tiny_model_dir, reward_model_path=tiny_reward_dir).model.config._attn_implementation == "sdpa"


def test_flash_attention_without_its_package_is_one_clear_error(tiny_model_dir):
    from lit_rlhf.dpo import DPOModule
    from lit_rlhf.errors import UserError

    with pytest.raises(UserError, match="attn_implementation flash_attention_2"):
        DPOModule(model_name_or_path=tiny_model_dir, attn_implementation="flash_attention_2")
