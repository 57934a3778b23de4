"""One generation path for every caller: the fastest engine installed, the same answers.

`generate` (left-padded prompt tensors in, responses cut after the first EOS out) and
`generate_answers` (token-id prompts in, one dict per prompt out) take an engine:

- `hf`: a decode loop of our own over the transformers model (`decode`) instead of `model.generate`:
  one forward per new token on a preallocated KV cache, grouped KV heads never copied per query head,
  the LM head on the last position only, greedy or sampled from the whole vocabulary at a temperature,
  rows that reached EOS leaving the batch; in bf16 on a CPU with bf16 units each step after the prompt is
  `fused_decode.FusedLlama`'s (Llama-architecture models). Greedy answers are token-identical to `model.generate`'s.
- `vllm`: `vllm_engine.VLLMEngine`, started once per architecture and dtype (from the model's config,
  random weights) and given the model's current weights at every call.
- `auto`: `hf` where it steps with `fused_decode` (a Llama-architecture model in bf16 on a CPU with bf16
  units, where an evaluation took as long as with vLLM: docs/speed.md), else vLLM when it is installed and starts, else `hf`.

What each part gave, measured: docs/speed.md, "Generation".
"""

import importlib.util
import tempfile
import warnings
from contextlib import contextmanager
from typing import Iterator, Literal, Optional

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from tqdm import tqdm
from transformers import AttentionInterface, DynamicCache, GenerationConfig
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lit_rlhf.data import collate_prompts
from lit_rlhf.fused_decode import FusedLlama, fusable
from lit_rlhf.models import merged_weights, unwrap
from lit_rlhf.ops import grouped_query_attention, position_ids, truncate_after_eos
from lit_rlhf.vllm_engine import VLLMEngine

Engine = Literal["auto", "hf", "vllm"]


GQA_SDPA = "lit_rlhf_gqa_sdpa"


def gqa_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                       dropout: float = 0.0, scaling=None, **kwargs) -> tuple[torch.Tensor, None]:  # fmt: skip
    """transformers' SDPA attention, but with the grouped key/value heads never copied per query head (`ops.grouped_query_attention`):
    query (B, H, q, D), key and value (B, KV, k, D) -> (B, q, H, D). transformers copies each layer's whole KV cache
    KV -> H heads before SDPA whenever there is a mask (`repeat_kv`); on a CPU that copy costs more than the attention."""
    is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    out = grouped_query_attention(query, key, value, attention_mask, is_causal, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(GQA_SDPA, gqa_sdpa_attention)
AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)


@contextmanager
def grouped_kv_attention(model: nn.Module) -> Iterator[None]:
    """`gqa_sdpa_attention` in a transformers model that uses SDPA, for the time of the block (others untouched)."""
    inner = unwrap(model)
    if inner.config._attn_implementation != "sdpa":
        yield
        return
    inner.set_attn_implementation(GQA_SDPA)
    try:
        yield
    finally:
        inner.set_attn_implementation("sdpa")


class PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values (B, KV, T, D) are views of buffers sized for the whole generation
    (`capacity` positions): a new token's keys and values are written in place, where `DynamicLayer` copies the
    whole cache (`torch.cat`) at every step."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Append key_states, value_states (B, KV, t, D). -> all keys and values so far, (B, KV, T, D) each"""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            B, KV, _, D = key_states.shape
            self.buffers = tuple(key_states.new_empty(B, KV, self.capacity, D) for _ in range(2))
        start, end = self.get_seq_length(), self.get_seq_length() + key_states.shape[-2]
        self.buffers[0][:, :, start:end] = key_states
        self.buffers[1][:, :, start:end] = value_states
        self.keys, self.values = (buffer[:, :, :end] for buffer in self.buffers)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (b,) of the cache, as its first b rows, in place: only the rows that change place
        are copied, and only the positions written so far (`kept_rows` orders them so that few do)."""
        end, moved = self.get_seq_length(), (indices != torch.arange(len(indices), device=indices.device)).nonzero().squeeze(1)
        for buffer in self.buffers:
            buffer[moved, :, :end] = buffer[indices[moved], :, :end]
        self.buffers = tuple(buffer[: len(indices)] for buffer in self.buffers)
        self.keys, self.values = (buffer[:, :, :end] for buffer in self.buffers)


def kept_rows(going: torch.Tensor) -> torch.Tensor:
    """The indices of the rows still `going` (B,) bool, in the order that moves the fewest: with b rows going, each
    of the first b rows that stopped is replaced by one going from past b, the others keep their place. Copying a
    cache's every kept row instead (`DynamicCache`'s way) was a large share of a greedy pass (docs/speed.md). -> (b,)"""
    b = int(going.sum())
    kept = torch.arange(b, device=going.device)
    kept[(~going[:b]).nonzero().squeeze(1)] = going[b:].nonzero().squeeze(1) + b
    return kept


def kv_cache(model: nn.Module, capacity: int) -> DynamicCache:
    """An empty KV cache for `model`, preallocated for `capacity` positions where all its layers are plain
    `DynamicLayer`s (no sliding window, no linear attention)."""
    cache = DynamicCache(config=unwrap(model).config)
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return cache


@contextmanager
def kv_cache_kept(model: nn.Module) -> Iterator[None]:
    """Gradient checkpointing off for the time of the block: transformers drops the KV cache of a layer that
    checkpoints (in train mode), so each new token would see no context. Nothing is checkpointed without grad anyway."""
    modules = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for module in modules:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in modules:
            module.gradient_checkpointing = True


def next_tokens(logits: torch.Tensor, temperature: float, eos_token_id: int, allow_eos: bool) -> torch.Tensor:
    """The next token of each row from its last logits (B, V): argmax when `temperature` is 0, else drawn from
    softmax(logits / temperature) over the whole vocabulary (`sample`); EOS is forbidden until `allow_eos`. -> (B,)"""
    if not allow_eos:
        logits = logits.clone()
        logits[:, eos_token_id] = -float("inf")
    if temperature == 0:
        # the first index of the maximum, as argmax, in the model's dtype (widening to fp32 is exact); `max` is 5x faster
        return logits.max(-1).indices
    return sample((logits.float() / temperature).softmax(-1))


def sample(probs: torch.Tensor) -> torch.Tensor:
    """One index per row drawn from `probs` (B, V) by inverting its cumulative sum at one uniform draw per row: the
    first index whose cumulative probability exceeds u * total, so an index of probability 0 is never drawn. On a
    CPU `torch.multinomial` draws V random numbers per row (docs/speed.md: 40x slower here). -> (B,)"""
    cumulative = probs.cumsum(-1)  # (B, V)
    u = torch.rand(len(probs), 1, device=probs.device) * cumulative[:, -1:]  # (B, 1), below the total
    return torch.searchsorted(cumulative, u, right=True).squeeze(1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) at `tokens`: the log-prob of each row's token under the model at temperature 1, computed
    in fp32. logits (B, V), tokens (B,) -> (B,)"""
    return logits.gather(1, tokens[:, None]).squeeze(1).float() - logits.float().logsumexp(-1)


@torch.no_grad()
def decode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, eos_token_id: int,
           pad_token_id: int, temperature: float = 0.0, min_new_tokens: int = 0, logprobs: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:  # fmt: skip
    """Up to `max_new_tokens` new tokens after left-padded prompts `input_ids`, `attention_mask` (B, P), greedy when
    `temperature` is 0. A row stops at its first EOS (not before `min_new_tokens`) and leaves the batch; the loop
    stops when every row has. -> (B, R) new tokens, `pad_token_id` after a row's EOS, R the longest row; and with
    `logprobs` each new token's log-prob under the model at temperature 1 (`token_logprobs`, (B, R) fp32, 0 after
    a row's EOS), else None."""
    with grouped_kv_attention(model), kv_cache_kept(model):
        return decode_loop(model, input_ids, attention_mask, max_new_tokens, eos_token_id, pad_token_id, temperature, min_new_tokens, logprobs)


def decode_loop(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, eos_token_id: int,
                pad_token_id: int, temperature: float, min_new_tokens: int, logprobs: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:  # fmt: skip
    """`decode`'s loop. -> (B, R), (B, R) or None"""
    B, device = input_ids.shape[0], input_ids.device
    out = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    out_logps = torch.zeros(B, max_new_tokens, device=device) if logprobs else None
    rows = torch.arange(B, device=device)  # the rows still generating
    cache, mask = kv_cache(model, input_ids.shape[1] + max_new_tokens), attention_mask
    positions = position_ids(mask)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    positions = positions[:, -1:] + 1  # (B, 1)
    fused = FusedLlama(model, merged_weights(model, torch.bfloat16)) if fusable(model) else None
    for step in range(max_new_tokens):
        tokens = next_tokens(logits, temperature, eos_token_id, allow_eos=step >= min_new_tokens)  # (b,)
        out[rows, step] = tokens
        if logprobs:
            out_logps[rows, step] = token_logprobs(logits, tokens)
        going = tokens != eos_token_id
        if step == max_new_tokens - 1 or not going.any():
            return out[:, : step + 1], None if out_logps is None else out_logps[:, : step + 1]
        if not going.all():
            kept = kept_rows(going)
            cache.batch_select_indices(kept)
            rows, tokens, mask, positions = rows[kept], tokens[kept], mask[kept], positions[kept]
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
        if fused is not None:
            logits = fused(tokens, positions, mask, cache)
        else:
            logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True).logits[:, -1]
        positions = positions + 1
    return out, out_logps


VLLM_ENGINES: dict[tuple[str, torch.dtype], Optional[VLLMEngine]] = {}  # by `engine_key`; None: vLLM did not start


def engine_key(model: nn.Module) -> tuple[str, torch.dtype]:
    """What one vLLM engine serves: `model`'s architecture (its config) and dtype, the key of `VLLM_ENGINES`."""
    inner = unwrap(model)
    return inner.config.to_json_string(), next(inner.parameters()).dtype


def started_vllm(model: nn.Module, tokenizer, engine: Engine) -> Optional[VLLMEngine]:
    """The `VLLMEngine` for `model`'s architecture and dtype, or None (generate with HF) where `engine` is `hf`, or `auto`
    and the HF loop steps with `fused_decode` (an evaluation as fast as vLLM's, and transformers' own logits), vLLM is not installed,
    cannot serve this process (sharded weights, a multi-process run: vLLM starts a process group of its own) or does
    not start for this model (warned once). Started once per architecture and dtype, from the config alone (random
    weights, `load_format="dummy"`): push the model's weights before sampling."""
    if engine not in ("auto", "hf", "vllm"):
        raise ValueError(f"engine must be auto, hf or vllm, not {engine!r}")
    if engine == "hf" or (engine == "auto" and (fusable(model) or importlib.util.find_spec("vllm") is None)):
        return None
    multi_process = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    if engine == "auto" and (multi_process or isinstance(model, FSDPModule)):
        return None
    inner, key = unwrap(model), engine_key(model)
    dtype = key[1]
    if key not in VLLM_ENGINES:
        folder = tempfile.mkdtemp(prefix="lit-rlhf-vllm-")
        inner.config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        try:
            VLLM_ENGINES[key] = VLLMEngine(folder, inner.config.max_position_embeddings, dtype, seed=0, load_format="dummy")
        except Exception as error:  # an architecture vLLM does not know, a broken install
            if engine == "vllm":
                raise
            warnings.warn(f"vLLM did not start ({type(error).__name__}: {error}); generating with the HF engine")
            VLLM_ENGINES[key] = None
    return VLLM_ENGINES[key]


def generate(model: nn.Module, prompts: dict[str, torch.Tensor], tokenizer, max_new_tokens: int, temperature: float = 0.0,
             min_new_tokens: int = 0, engine: Engine = "auto", synced: bool = False, logprobs: bool = False) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Responses to left-padded prompts `input_ids`, `attention_mask` (B, P): greedy when `temperature` is 0, else
    sampled at `temperature` from the whole vocabulary; stopped at the tokenizer's EOS, not before `min_new_tokens`.
    `auto` falls back to `hf` (with a warning) when vLLM does not start for this model (`started_vllm`). `synced`:
    the parameters are sharded over processes (FSDP, DeepSpeed ZeRO-3), so every forward is a collective and every
    process must keep stepping until all are done: `transformers_generate(synced_gpus=True)`, whatever `engine`.

    Returns responses, response_mask (B, R), contains_eos (B,), cut after the first EOS (`ops.truncate_after_eos`);
    with `logprobs` also each response token's log-prob under the sampling model at temperature 1 (B, R) fp32, 0 on
    padding (`temperature` 0 or 1 only: vLLM gives them at the sampling temperature; not with `synced`)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if logprobs and (synced or temperature not in (0.0, 1.0)):
        raise ValueError("generate: log-probs are given for greedy or temperature-1 answers of an unsharded model, "
                         f"not at temperature {temperature}{' with synced' if synced else ''}")
    if synced:
        return transformers_generate(model, prompts, tokenizer, max_new_tokens, temperature, min_new_tokens, synced_gpus=True)
    engine = started_vllm(model, tokenizer, engine)
    if engine is not None:
        engine.push(merged_weights(model, engine.dtype))
        ids = [row[mask.bool()].tolist() for row, mask in zip(prompts["input_ids"], prompts["attention_mask"])]
        seed = int(torch.randint(2**31, ()))  # from torch's stream: a seeded caller gets the same samples again
        out = engine.sample(ids, 1, max_new_tokens, temperature, eos, pad, seed, min_tokens=min_new_tokens)
        return tuple(tensor.to(prompts["input_ids"].device) for tensor in out[: 4 if logprobs else 3])
    tokens, logps = decode(model, prompts["input_ids"], prompts["attention_mask"], max_new_tokens, eos, pad, temperature, min_new_tokens, logprobs)
    responses, response_mask, contains_eos = truncate_after_eos(tokens, eos, pad)
    return (responses, response_mask, contains_eos) + ((logps * response_mask,) if logprobs else ())


def transformers_generate(model: nn.Module, prompts: dict[str, torch.Tensor], tokenizer, max_new_tokens: int, temperature: float,
                          min_new_tokens: int, synced_gpus: bool) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """`generate` through `model.generate` (the same answers as `decode`'s, one step slower each), for `synced_gpus`:
    greedy or sampled from the whole vocabulary (top_k 0, top_p 1) at `temperature`. -> as `generate`"""
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id, **sampling)  # fmt: skip
    with kv_cache_kept(model):
        out = model.generate(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"], generation_config=config, synced_gpus=synced_gpus)
    return truncate_after_eos(out[:, prompts["input_ids"].shape[1] :], tokenizer.eos_token_id, tokenizer.pad_token_id)


@torch.no_grad()
def generate_answers(model: nn.Module, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int, sample: bool = False,
                     temperature: float = 1.0, engine: Engine = "hf", min_new_tokens: int = 0, logprobs: bool = False,
                     progress: Optional[str] = None) -> list[dict]:  # fmt: skip
    """Greedy (or, with `sample`, sampled at `temperature` from the whole vocabulary) answers to tokenized prompts:
    per prompt, in their order, its `response` ids (cut after the first EOS), `text` and whether it ended with EOS
    (`eos`); with `logprobs`, each response token's log-prob under `model` at temperature 1 (`logprobs`, from the
    decoding itself: `generate`). The HF engine answers `batch_size` prompts at a time, prompts of similar lengths
    together (less padding); vLLM takes them all and schedules them itself. `progress`: a bar of that title on stderr,
    moved on as each batch is answered."""
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    size = len(order) if started_vllm(model, tokenizer, engine) is not None else batch_size
    answers: list[Optional[dict]] = [None] * len(prompt_ids)
    for start, batch in prompt_batches([prompt_ids[i] for i in order], size, tokenizer.pad_token_id, unwrap(model).device, progress):
        rows = order[start : start + size]
        out = generate(model, batch, tokenizer, max_new_tokens, temperature if sample else 0.0, min_new_tokens, engine, logprobs=logprobs)
        for j, (i, r, m, e) in enumerate(zip(rows, out[0], out[1], out[2].tolist())):
            ids = r[m.bool()].tolist()
            answers[i] = {"response": ids, "text": tokenizer.decode(ids, skip_special_tokens=True).strip(), "eos": e}
            if logprobs:
                answers[i]["logprobs"] = out[3][j][m.bool()].tolist()
    return answers


def prompt_batches(prompt_ids: list[list[int]], size: int, pad_id: int, device: torch.device, progress: Optional[str] = None):
    """Tokenized prompts `size` at a time, in their order, as (index of the batch's first prompt, left-padded
    `input_ids` and `attention_mask` (b, L) on `device`). `progress`: a bar of that title on stderr, moved on by a
    batch's prompts once the batch is done with (the next one asked for)."""
    with tqdm(total=len(prompt_ids), desc=progress, unit="prompt", mininterval=0, disable=progress is None) as bar:
        for start in range(0, len(prompt_ids), size):
            batch = collate_prompts([{"prompt": ids} for ids in prompt_ids[start : start + size]], pad_id)
            yield start, {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}
            bar.update(len(batch["input_ids"]))
