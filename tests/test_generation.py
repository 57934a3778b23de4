"""The one generation path (lit_rlhf/generation.py): the same answers as `model.generate`, from every engine.

Its vLLM engine is tested in tests/test_vllm.py, with the other vLLM checks in one process of their own (vLLM
starts a process group and pins torch's threads in the process it runs in): the same model and prompts.
"""

import types
import copy
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_causal_lm
from lit_rlhf.data import collate_prompts, collate_sequences
from lit_rlhf.evaluate import completion_logps
from lit_rlhf.generation import PreallocatedLayer, decode, generate, generate_answers, kept_rows, sample, transformers_generate
from lit_rlhf.ops import truncate_after_eos
from lit_rlhf.tokenization import render_prompt, tokenize

QUESTIONS = ["hi", "hello there, how are you doing today?", "a", "what is 2+2? tell me now please", "xyz abc", "ok",
             "tell me a story about cats"]  # fmt: skip
NEW_TOKENS = 24


def chatty_lm(tokenizer, num_attention_heads: int = 4, num_key_value_heads: int = 2, eos_like: int = 39):
    """The tiny LM with weights of std 0.2 (at the default 0.02 it repeats one token) and EOS's embedding (tied: also
    its output row) a copy of byte `eos_like`'s, a little longer: greedy rows end at different steps, some not at all
    (`eos_like` found by trying the bytes these weights answer most)."""
    model = make_causal_lm(tokenizer, num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads)
    torch.manual_seed(1)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(0, 0.2)
        embeddings = model.get_input_embeddings().weight
        embeddings[tokenizer.eos_token_id] = 1.02 * embeddings[eos_like]
    return model.eval()


def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenize(tokenizer, render_prompt(tokenizer, [{"role": "user", "content": q}])) for q in QUESTIONS]


def left_padded(tokenizer) -> dict[str, torch.Tensor]:
    batch = collate_prompts([{"prompt": p} for p in prompt_ids(tokenizer)], tokenizer.pad_token_id)
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def hf_generate(model, tokenizer, batch, **kwargs) -> torch.Tensor:
    """`model.generate`'s new tokens (B, R)."""
    out = model.generate(**batch, max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)
    return out[:, batch["input_ids"].shape[1] :]


def assert_rows_end_at_different_steps(responses: torch.Tensor, eos_token_id: int) -> None:
    """The premise of an equivalence test: some rows end at different steps, some do not end. (B, R)"""
    ends = {int(row.nonzero()[0]) if row.any() else None for row in responses == eos_token_id}
    assert None in ends and len(ends - {None}) >= 2, ends


@pytest.fixture(scope="module")
def model(tokenizer):
    return chatty_lm(tokenizer)


def test_greedy_answers_are_those_of_model_generate(model, tokenizer):
    batch = left_padded(tokenizer)
    assert batch["attention_mask"].min() == 0  # left padding, pad == EOS
    expected = hf_generate(model, tokenizer, batch, do_sample=False)
    assert_rows_end_at_different_steps(expected, tokenizer.eos_token_id)
    responses, mask, eos = generate(model, batch, tokenizer, NEW_TOKENS, engine="hf")
    assert torch.equal(responses, expected)
    assert all(map(torch.equal, (responses, mask, eos), truncate_after_eos(expected, tokenizer.eos_token_id, tokenizer.pad_token_id)))


def test_greedy_answers_do_not_depend_on_the_batch(model, tokenizer):
    """Sorted by length and batched 3 at a time, in the prompts' order: each answer as the prompt alone gets it."""
    prompts = prompt_ids(tokenizer)
    answers = generate_answers(model, tokenizer, prompts, NEW_TOKENS, batch_size=3)
    for prompt, answer in zip(prompts, answers):
        alone = hf_generate(model, tokenizer, {"input_ids": torch.tensor([prompt]), "attention_mask": torch.ones(1, len(prompt), dtype=torch.long)})
        ids, _, eos = truncate_after_eos(alone, tokenizer.eos_token_id, tokenizer.pad_token_id)
        assert answer["response"] == ids[0][: len(answer["response"])].tolist() and answer["eos"] == eos.item()
        assert answer["eos"] or len(answer["response"]) == NEW_TOKENS


def test_a_progress_bar_counts_the_prompts_answered_batch_by_batch(model, tokenizer, capsys):
    prompts = prompt_ids(tokenizer)  # 7 prompts, 3 at a time
    generate_answers(model, tokenizer, prompts, 2, batch_size=3, progress="answers")
    bar = capsys.readouterr().err
    assert [f"{n}/7" in bar for n in (3, 6, 7)] == [True] * 3 and bar.count("answers:") >= 3
    generate_answers(model, tokenizer, prompts, 2, batch_size=3)
    assert capsys.readouterr().err == ""  # no title, no bar


def test_rows_that_stop_are_replaced_by_rows_from_the_end_and_the_cache_follows():
    going = torch.tensor([False, True, True, False, True, False, True])  # 4 go on: rows 0 and 3 stopped among the first 4
    assert kept_rows(going).tolist() == [4, 1, 2, 6]
    assert kept_rows(torch.tensor([True, True, False])).tolist() == [0, 1]  # nothing to move
    layer = PreallocatedLayer(capacity=5)
    keys = torch.arange(7.0)[:, None, None, None].expand(7, 1, 3, 2)  # (B, KV, t, D): row i holds i
    layer.update(keys, -keys)
    layer.batch_select_indices(kept_rows(going))
    assert layer.keys.shape == (4, 1, 3, 2) and layer.keys[:, 0, :, 0].tolist() == [[4.0] * 3, [1.0] * 3, [2.0] * 3, [6.0] * 3]
    assert torch.equal(layer.values, -layer.keys)
    layer.update(torch.full((4, 1, 1, 2), 9.0), torch.zeros(4, 1, 1, 2))  # the next token lands after the kept rows' 3
    assert layer.keys.shape == (4, 1, 4, 2) and layer.keys[:, 0, 3, 0].tolist() == [9.0] * 4 and layer.keys[0, 0, 2, 0] == 4.0


def test_min_new_tokens_forbids_eos_until_then(model, tokenizer):
    batch = left_padded(tokenizer)
    responses, mask, eos = generate(model, batch, tokenizer, NEW_TOKENS, min_new_tokens=NEW_TOKENS, engine="hf")
    assert mask.all() and not eos.any() and responses.shape == (len(QUESTIONS), NEW_TOKENS)
    assert torch.equal(responses, hf_generate(model, tokenizer, batch, do_sample=False, min_new_tokens=NEW_TOKENS))


def within_sampling_error(frequencies: torch.Tensor, probs: torch.Tensor, n: int) -> bool:
    """Every frequency of n draws within 4 binomial standard errors (+ 1/n) of its probability. (V,), (V,)"""
    return bool(((frequencies - probs).abs() <= 4 * (probs * (1 - probs) / n).sqrt() + 1 / n).all())


def test_sampling_draws_each_token_with_its_probability():
    """Inverse-CDF sampling: frequencies within 4 standard errors of the probabilities, tokens of probability 0 (first,
    inner, last, as a forbidden EOS is) never drawn, the same draws from the same seed."""
    probs = torch.tensor([0.0, 0.1, 0.0, 0.2, 0.3, 0.4, 0.0])
    n = 20_000
    torch.manual_seed(0)
    drawn = sample(probs.repeat(n, 1))
    frequencies = torch.bincount(drawn, minlength=len(probs)) / n
    assert within_sampling_error(frequencies, probs, n)
    assert frequencies[probs == 0].sum() == 0
    torch.manual_seed(0)
    assert torch.equal(sample(probs.repeat(n, 1)), drawn)
    assert torch.equal(sample(torch.eye(3)), torch.arange(3))  # one certain token per row


def test_sampled_decoding_draws_from_the_models_tempered_distribution(model, tokenizer):
    """The first sampled token of one prompt, many times: its frequencies follow softmax(logits / temperature) of the
    model's own next-token logits (and not those at another temperature), EOS forbidden by `min_new_tokens`."""
    prompt = left_padded(tokenizer)["input_ids"][:1, -6:]
    with torch.no_grad():
        logits = model(prompt).logits[0, -1]
    logits[tokenizer.eos_token_id] = -float("inf")
    n = 4000
    torch.manual_seed(0)
    first = decode(model, prompt.repeat(n, 1), torch.ones(n, prompt.shape[1], dtype=torch.long), 1, tokenizer.eos_token_id, tokenizer.pad_token_id, 0.7, 1)[0][:, 0]
    frequencies = torch.bincount(first, minlength=len(logits)) / n
    assert within_sampling_error(frequencies, (logits / 0.7).softmax(-1), n)
    assert not within_sampling_error(frequencies, logits.softmax(-1), n)  # the check tells temperatures apart
    assert frequencies[tokenizer.eos_token_id] == 0


def test_the_decodings_logprobs_are_the_models_own(model, tokenizer):
    """The log-prob of each greedy or temperature-1 token, from the decoding that drew it: the model's forward over
    the finished answers gives the same (fp32), 0 on padding; at another temperature they are refused."""
    batch = left_padded(tokenizer)
    for temperature in (0.0, 1.0):
        torch.manual_seed(0)
        responses, mask, _, logps = generate(model, batch, tokenizer, NEW_TOKENS, temperature, engine="hf", logprobs=True)
        pairs = [(p, r[m.bool()].tolist()) for p, r, m in zip(prompt_ids(tokenizer), responses, mask)]
        with torch.no_grad():
            expected = completion_logps(model, collate_sequences(pairs, tokenizer.pad_token_id), width=responses.shape[1])
        assert torch.allclose(logps, expected, atol=1e-5) and (logps[mask == 0] == 0).all() and (logps[mask == 1] < 0).all()
    with pytest.raises(ValueError, match="temperature 0.7"):
        generate(model, batch, tokenizer, NEW_TOKENS, 0.7, engine="hf", logprobs=True)


def test_transformers_generate_for_sharded_policies_answers_as_the_decode_loop(model, tokenizer):
    """`synced` (FSDP) generation goes through `model.generate`: the same greedy answers, cut the same way."""
    batch = left_padded(tokenizer)
    expected = generate(model, batch, tokenizer, NEW_TOKENS, 0.0, min_new_tokens=1, engine="hf")
    assert_rows_end_at_different_steps(expected[0], tokenizer.eos_token_id)
    assert all(map(torch.equal, transformers_generate(model, batch, tokenizer, NEW_TOKENS, 0.0, 1, synced_gpus=False), expected))


def test_a_lora_policy_generates_with_its_adapter(model, tokenizer):
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    batch = left_padded(tokenizer)
    expected = hf_generate(policy, tokenizer, batch, do_sample=False)
    assert torch.equal(generate(policy, batch, tokenizer, NEW_TOKENS, engine="hf")[0], expected)
    assert not torch.equal(expected, hf_generate(model, tokenizer, batch, do_sample=False))  # the adapter changes answers


@pytest.mark.parametrize("fast", [True, False])
def test_a_policy_that_checkpoints_its_layers_generates_with_its_kv_cache(model, tokenizer, fast):
    """PPO trains with gradient checkpointing in train mode, where transformers drops the layers' KV cache."""
    batch, policy = left_padded(tokenizer), copy.deepcopy(model)
    expected = hf_generate(policy, tokenizer, batch, do_sample=False)
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    with torch.no_grad():
        generated = generate(policy, batch, tokenizer, NEW_TOKENS, engine="hf") if fast else transformers_generate(policy, batch, tokenizer, NEW_TOKENS, 0.0, 0, False)
    responses = generated[0]
    assert torch.equal(responses, truncate_after_eos(expected, tokenizer.eos_token_id, tokenizer.pad_token_id)[0])
    assert policy.model.gradient_checkpointing and policy.training  # as it was


def test_an_unknown_engine_is_refused(model, tokenizer):
    with pytest.raises(ValueError, match="auto, hf or vllm"):
        generate(model, left_padded(tokenizer), tokenizer, 2, engine="fast")


def test_the_benchmarks_memory_limit_by_hand():
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import generation as benchmark  # benchmarks/generation.py

    # 1 GB of weights and 2 rows of 10 prompt + 20 / 2 cached positions at 1 MB each: 1.04 GB a step; at 10.4 GB/s 10
    # steps a second, 2 tokens each
    cell = {"batch": 2, "new_tokens": 20, "prompt_length": 10, "weight_bytes": 1e9, "kv_bytes_per_position": 1e6}
    assert benchmark.memory_limit(cell, gb_per_s=10.4) == pytest.approx(20.0)


def test_vllm_requests_are_sent_in_runs_that_fit_its_kv_cache_and_one_prefill_step():
    """vLLM on a CPU cannot resume a seeded request it stopped half-way (preempted for lack of KV blocks, or its prefill
    split over steps): each run must fit the KV cache and be prefilled in one step."""
    from lit_rlhf.vllm_engine import VLLMEngine

    def engine(blocks: int, step_tokens: int):
        config = types.SimpleNamespace(cache_config=types.SimpleNamespace(block_size=4, num_gpu_blocks=blocks),
                                       scheduler_config=types.SimpleNamespace(max_num_batched_tokens=step_tokens))  # fmt: skip
        return types.SimpleNamespace(llm=types.SimpleNamespace(llm_engine=types.SimpleNamespace(vllm_config=config)))

    prompts = [[1] * 3, [2] * 5, [3] * 1]  # with 4 new tokens: 7, 9, 5 positions -> 2, 3, 2 blocks of 4 per response
    assert list(VLLMEngine.fitting(engine(6, 100), prompts, 1, 4)) == [prompts[:2], prompts[2:]]  # 2 + 3 <= 6 < 2 + 3 + 2
    assert list(VLLMEngine.fitting(engine(6, 100), prompts, 2, 4)) == [prompts[:1], prompts[1:2], prompts[2:]]  # 4, 6, 4 blocks
    assert list(VLLMEngine.fitting(engine(100, 8), prompts, 1, 4)) == [prompts[:2], prompts[2:]]  # 3 + 5 prompt tokens <= 8 < 9
    assert list(VLLMEngine.fitting(engine(100, 8), prompts, 2, 4)) == [prompts[:1], prompts[1:2], prompts[2:]]  # 6, 10 (alone), 2
    assert list(VLLMEngine.fitting(engine(6, 100), [[1] * 40], 1, 4)) == [[[1] * 40]]  # too long for the cache: sent alone
