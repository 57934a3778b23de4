"""Rollout engines: who samples the responses of an RL step (`--model.rollout_engine`).

An engine is a class with two methods:

    sync(policy)                                      the next samples come from `policy`'s current weights
    sample(prompts, k, max_new_tokens, temperature)   -> Samples: k responses to each prompt

`prompts` is the DataModule's batch of prompts: left-padded `input_ids` and `attention_mask` (B, P), and
the rows' `prompt_text` and `columns` for an engine that reads them. The B * k responses come back in
groups: rows i*k .. i*k + k - 1 answer prompt i. Temperature 0 is greedy.

The class is constructed once with the PPO module, when `fit` starts (or at the first rollout outside a
run), and reads what it needs from it: `model`, `tokenizer`, `hparams`, `trainer`. `ROLLOUT_ENGINES`
names the built-ins; `--model.rollout_engine my_engines.py:MyEngine` takes one of your own.
"""

from dataclasses import dataclass
from typing import Optional, Protocol

import torch
from torch import nn

from lit_rlhf.distributed import sharded
from lit_rlhf.errors import UserError
from lit_rlhf.generation import generate
from lit_rlhf.models import merged_weights, unwrap
from lit_rlhf.vllm_engine import VLLMEngine

Batch = dict[str, torch.Tensor]  # input_ids, attention_mask: (B, P), prompts left-padded


@dataclass
class Samples:
    """What an engine sampled: N = B * k responses, the k responses of a prompt contiguous; R the longest."""

    responses: torch.Tensor  # (N, R) token ids, cut after the first EOS, the pad id after it
    response_mask: torch.Tensor  # (N, R) 1 on the tokens the policy attends to: its own and, multi-turn, the observations
    contains_eos: torch.Tensor  # (N,) bool
    sampler_logprobs: Optional[torch.Tensor] = None  # (N, R) the engine's log-probs of its tokens; None: the policy's own
    policy_mask: Optional[torch.Tensor] = None  # (N, R) 1 on the policy's own sampled tokens, what the loss counts; None: response_mask

    def __post_init__(self):
        self.policy_mask = self.response_mask if self.policy_mask is None else self.policy_mask


class RolloutEngine(Protocol):
    def __init__(self, module) -> None: ...

    def sync(self, policy: nn.Module) -> None: ...

    def sample(self, prompts: Batch, k: int, max_new_tokens: int, temperature: float) -> Samples: ...


class HFRollout:
    """The policy itself, through the decode loop of lit_rlhf/generation.py.

    With parameters sharded over processes (FSDP, DeepSpeed ZeRO-3) every forward is a collective: there it is
    `model.generate(synced_gpus=True)`, which keeps every process stepping until all are done. Under DDP each
    process holds the whole policy, and one that finishes early waits for nobody."""

    def __init__(self, module):
        self.module = module

    def sync(self, policy: nn.Module) -> None:
        """Nothing to send: the engine samples from the policy's own weights."""

    def sample(self, prompts: Batch, k: int, max_new_tokens: int, temperature: float) -> Samples:
        """`k` responses to each prompt of `prompts` (B, P): responses, response_mask (B * k, R), contains_eos (B * k,)."""
        model, tokenizer = self.module.model, self.module.tokenizer
        repeated = {key: prompts[key].repeat_interleave(k, 0) for key in ("input_ids", "attention_mask")}  # (B * k, P)
        return Samples(*generate(model, repeated, tokenizer, max_new_tokens, temperature, min_new_tokens=1, engine="hf", synced=sharded(self.module._trainer)))


class VLLMRollout:
    """A vLLM engine in this process, sent the policy's weights before every rollout; an extra: `pip install
    'lit-rlhf[vllm]'`, lit_rlhf/vllm_engine.py.

    It starts from `--model.model_name_or_path` in the precision the trainer computes in, holding the longest
    prompt + response of the run. One process only: vLLM starts a process group of its own, which a
    multi-process strategy's would clash with. Its log-probs of its samples are returned beside them."""

    def __init__(self, module):
        hp, trainer = module.hparams, module.trainer
        if trainer.world_size > 1:
            raise UserError(f"--model.rollout_engine vllm runs in one process here, not {trainer.world_size}: drop --trainer.strategy or use hf")
        if str(hp.model_name_or_path).endswith(".gguf"):
            raise UserError(f"--model.rollout_engine vllm starts from a transformers folder or hub id, not {hp.model_name_or_path}: save the model once (lit-rlhf fetch-smollm2)")
        dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
        dm = trainer.datamodule  # without one, prompts may be as long as the model's positions
        max_model_len = dm.hparams.max_prompt_length + hp.response_length if dm is not None else unwrap(module.model).config.max_position_embeddings
        self.engine = VLLMEngine(hp.model_name_or_path, max_model_len, dtype, seed=int(torch.initial_seed()) % 2**31,
                                 gpu_memory_utilization=hp.vllm_gpu_memory_utilization)  # fmt: skip
        self.eos_token_id, self.pad_token_id = module.tokenizer.eos_token_id, module.tokenizer.pad_token_id

    def sync(self, policy: nn.Module) -> None:
        """Load the policy's current weights into the engine (a LoRA policy merged: `models.merged_weights`)."""
        self.engine.push(merged_weights(policy, self.engine.dtype))

    def sample(self, prompts: Batch, k: int, max_new_tokens: int, temperature: float) -> Samples:
        """`k` responses to each prompt of `prompts` (B, P): responses, response_mask, vLLM's log-probs (B * k, R),
        contains_eos (B * k,)."""
        ids = [row[mask.bool()].tolist() for row, mask in zip(prompts["input_ids"], prompts["attention_mask"])]  # left padding dropped
        seed = int(torch.randint(2**31, ()))  # from the run's stream: a resumed run samples as the uninterrupted one
        out = self.engine.sample(ids, k, max_new_tokens, temperature, self.eos_token_id, self.pad_token_id, seed)
        responses, response_mask, contains_eos, logprobs = (tensor.to(prompts["input_ids"].device) for tensor in out)
        return Samples(responses, response_mask, contains_eos, sampler_logprobs=logprobs)


def summary(engine: type) -> str:
    """What `--help` says of a built-in engine: the first paragraph of its docstring, on one line, without its full stop."""
    text = " ".join(engine.__doc__.split("\n\n")[0].split()).rstrip(".")
    return text[0].lower() + text[1:]


#: `--model.rollout_engine` name -> engine class
ROLLOUT_ENGINES: dict[str, type] = {"hf": HFRollout, "vllm": VLLMRollout}
