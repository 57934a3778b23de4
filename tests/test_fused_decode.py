"""The fused bf16 decoding step (lit_rlhf/fused_decode.py): transformers' own logits, bit for bit, and the same answers."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lit_rlhf import fused_decode
from lit_rlhf.fused_decode import FusedLlama, fusable
from lit_rlhf.generation import generate, grouped_kv_attention, kv_cache
from lit_rlhf.models import merged_weights
from lit_rlhf.ops import position_ids
from test_generation import NEW_TOKENS, assert_rows_end_at_different_steps, chatty_lm, hf_generate, left_padded


@pytest.fixture(scope="module")
def bf16_model(tokenizer):
    return chatty_lm(tokenizer).to(torch.bfloat16)  # 2 query heads per KV head


@torch.no_grad()
def step_logits(model, tokenizer, fused: bool, steps: int = 6) -> list[torch.Tensor]:
    """The (B, V) logits of `steps` greedy decoding steps after the left-padded prompts, by `FusedLlama` or by the model."""
    batch = left_padded(tokenizer)
    step = FusedLlama(model, merged_weights(model, torch.bfloat16)) if fused else None
    with grouped_kv_attention(model):
        cache, mask = kv_cache(model, batch["input_ids"].shape[1] + steps), batch["attention_mask"]
        positions = position_ids(mask)
        logits = model(**batch, position_ids=positions, past_key_values=cache, logits_to_keep=1).logits[:, -1]
        positions, out = positions[:, -1:] + 1, []
        for _ in range(steps):
            tokens, mask = logits.max(-1).indices, torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
            if fused:
                logits = step(tokens, positions, mask, cache)
            else:
                logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache).logits[:, -1]
            out.append(logits)
            positions = positions + 1
    return out


def test_the_fused_step_gives_transformers_logits_bit_for_bit(bf16_model, tokenizer):
    expected, fused = step_logits(bf16_model, tokenizer, False), step_logits(bf16_model, tokenizer, True)
    assert all(torch.equal(a, b) for a, b in zip(expected, fused))
    assert not torch.equal(expected[0], expected[1])  # the steps see new tokens


def test_greedy_bf16_answers_through_the_fused_step_are_those_of_model_generate(bf16_model, tokenizer, monkeypatch):
    monkeypatch.setattr("lit_rlhf.generation.fusable", lambda model: True)  # the fused step also where oneDNN has no bf16
    calls = []
    monkeypatch.setattr(FusedLlama, "__call__", lambda self, *a: calls.append(1) or FUSED_CALL(self, *a))
    batch = left_padded(tokenizer)
    expected = hf_generate(bf16_model, tokenizer, batch, do_sample=False)
    assert_rows_end_at_different_steps(expected, tokenizer.eos_token_id)
    assert torch.equal(generate(bf16_model, batch, tokenizer, NEW_TOKENS, engine="hf")[0], expected)
    assert len(calls) == expected.shape[1] - 1  # every step after the prefill was the fused one


FUSED_CALL = FusedLlama.__call__


def test_a_lora_policy_steps_with_its_adapter_merged(bf16_model, tokenizer):
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(copy.deepcopy(bf16_model), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    before = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
    expected, fused = step_logits(policy, tokenizer, False), step_logits(policy, tokenizer, True)
    assert all(torch.equal(before[name], tensor) for name, tensor in policy.state_dict().items())  # merged beside, not in place
    peft_merged = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert all(torch.equal(peft_merged[name], tensor) for name, tensor in merged_weights(policy, torch.bfloat16).items())
    base = step_logits(bf16_model, tokenizer, False)
    moved = (expected[0] - base[0]).abs().max()  # the adapter moves the first step's logits by several units ...
    assert (expected[0] - fused[0]).abs().max() < moved / 20  # ... and the merged weights the same (bf16 rounding apart)


def test_only_what_the_fused_step_reproduces_is_fused(tokenizer):
    model = chatty_lm(tokenizer)
    assert not fusable(model)  # fp32 weights: transformers' own step, the reference answers
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fusable(model) == fused_decode.ONEDNN_BF16  # a bf16-mixed run's rollouts
    assert fusable(model.to(torch.bfloat16)) == fused_decode.ONEDNN_BF16
    for change in ({"attention_bias": True}, {"mlp_bias": True}, {"hidden_act": "gelu"}, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}):
        config = LlamaConfig(**(model.config.to_dict() | change))
        assert not fusable(LlamaForCausalLM(config).to(torch.bfloat16)), change


def test_auto_takes_the_hf_loop_where_it_steps_fused(bf16_model, tokenizer, monkeypatch):
    from lit_rlhf import generation

    started = []
    monkeypatch.setattr(generation, "VLLM_ENGINES", {})
    monkeypatch.setattr(generation, "VLLMEngine", lambda *args, **kwargs: started.append(args) or "engine")
    monkeypatch.setattr(generation.importlib.util, "find_spec", lambda name: object())  # vLLM installed
    monkeypatch.setattr(generation, "fusable", lambda model: True)
    assert generation.started_vllm(bf16_model, tokenizer, "auto") is None and not started
    assert generation.started_vllm(bf16_model, tokenizer, "vllm") == "engine"  # asked for by name
    monkeypatch.setattr(generation, "VLLM_ENGINES", {})
    monkeypatch.setattr(generation, "fusable", lambda model: False)
    assert generation.started_vllm(bf16_model, tokenizer, "auto") == "engine" and len(started) == 2
