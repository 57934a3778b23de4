"""Rollout engines: who samples the responses of an RL step (`--model.rollout_engine`).

An engine is a class with two methods:

    sync(policy)                                      the next samples come from `policy`'s current weights
    sample(prompts, k, max_new_tokens, temperature)   -> Samples: k responses to each prompt

`prompts` is the DataModule's batch of prompts: left-padded `input_ids` and `attention_mask` (B, P), and
the rows' `prompt_text` and `columns` for an engine that reads them. The B * k responses come back in
groups: rows i*k .. i*k + k - 1 answer prompt i. Temperature 0 is greedy. A multi-turn engine's responses
hold the policy's turns and the observations between them: `policy_mask` marks the ids the policy sampled.

The class is constructed once with the PPO module, when `fit` starts (or at the first rollout outside a
run), and reads what it needs from it: `model`, `tokenizer`, `hparams`, `trainer`. `ROLLOUT_ENGINES`
names the built-ins; `--model.rollout_engine my_engines.py:MyEngine` takes one of your own.
"""

from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lit_rlhf.data import collate_prompts
from lit_rlhf.distributed import sharded
from lit_rlhf.environments import ENDINGS, observation_text, sessions
from lit_rlhf.errors import UserError
from lit_rlhf.generation import generate
from lit_rlhf.models import merged_weights, unwrap
from lit_rlhf.plugins import resolve
from lit_rlhf.rewards import SupervisedWorker, checked
from lit_rlhf.tokenization import tokenize
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
    environment_rewards: Optional[torch.Tensor] = None  # (N,) the environment's reward of each rollout, nan: none (multi-turn)
    episode: Optional[dict[str, torch.Tensor]] = None  # name -> (N,) what a multi-turn engine counted of each rollout

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

    def __init__(self, module, response_tokens: Optional[int] = None):
        hp, trainer = module.hparams, module.trainer  # response_tokens: the longest response (default: `response_length`)
        if trainer.world_size > 1:
            raise UserError(f"--model.rollout_engine vllm runs in one process here, not {trainer.world_size}: drop --trainer.strategy or use hf")
        if str(hp.model_name_or_path).endswith(".gguf"):
            raise UserError(f"--model.rollout_engine vllm starts from a transformers folder or hub id, not {hp.model_name_or_path}: save the model once (lit-rlhf fetch-smollm2)")
        dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
        dm = trainer.datamodule  # without one, prompts may be as long as the model's positions
        max_model_len = dm.hparams.max_prompt_length + (response_tokens or hp.response_length) if dm is not None else unwrap(module.model).config.max_position_embeddings
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
        out = self.sampled_ids(ids, k, max_new_tokens, temperature)
        responses, response_mask, contains_eos, logprobs = (tensor.to(prompts["input_ids"].device) for tensor in out)
        return Samples(responses, response_mask, contains_eos, sampler_logprobs=logprobs)

    def sampled_ids(self, ids: list[list[int]], k: int, max_new_tokens: int, temperature: float) -> tuple[torch.Tensor, ...]:
        """`VLLMEngine.sample` of `k` responses to each prompt `ids` (no padding), seeded from the run's random stream
        (a resumed run samples as the uninterrupted one): responses, response_mask, contains_eos, logprobs."""
        seed = int(torch.randint(2**31, ()))
        return self.engine.sample(ids, k, max_new_tokens, temperature, self.eos_token_id, self.pad_token_id, seed)


@dataclass
class Conversation:
    """One multi-turn rollout as it grows: its response, the policy's turns and the observations in order."""

    ids: list[int] = field(default_factory=list)  # (R_i,) the response's token ids so far
    sampled: list[int] = field(default_factory=list)  # (R_i,) 1 on the ids the policy sampled, 0 on the observations'
    logprobs: list[float] = field(default_factory=list)  # (R_i,) the sampler's log-probs of the policy's ids, 0 on the observations'
    turns: int = 0  # policy turns
    tool_calls: int = 0
    tool_errors: int = 0
    contains_eos: bool = False  # the last policy turn ended with EOS
    ended_by: Optional[str] = None  # what ended it (`environments.ENDINGS`), once ended
    error: Optional[str] = None  # why the environment's call failed, if that ended it

    def add(self, ids: list[int], sampled: bool, logprobs: Optional[list[float]] = None) -> None:
        self.ids += ids
        self.sampled += [int(sampled)] * len(ids)
        self.logprobs += logprobs or [0.0] * len(ids)


def conversation_samples(conversations: list[Conversation], pad_token_id: int, environment_rewards: Optional[list], device,
                         sampler_logprobs: bool = False) -> Samples:  # fmt: skip
    """N finished `conversations` as Samples: responses, response_mask (every id), policy_mask (the sampled ids) (N, R),
    R the longest, right-padded, and with `sampler_logprobs` the sampler's log-probs (N, R); contains_eos (N,);
    `environment_rewards` (N,) checked, nan for None (None: no environment); `episode`: `turns`, `tool_calls`,
    `tool_errors` and a 0/1 `ended_by_<name>` per ending (N,) each."""
    N, R = len(conversations), max(len(c.ids) for c in conversations)
    responses = torch.full((N, R), pad_token_id, dtype=torch.long)
    response_mask, policy_mask, logprobs = torch.zeros(N, R, dtype=torch.long), torch.zeros(N, R, dtype=torch.long), torch.zeros(N, R)
    for i, c in enumerate(conversations):
        responses[i, : len(c.ids)], policy_mask[i, : len(c.ids)] = torch.tensor(c.ids), torch.tensor(c.sampled)
        response_mask[i, : len(c.ids)], logprobs[i, : len(c.ids)] = 1, torch.tensor(c.logprobs)
    counts = {name: [float(getattr(c, name)) for c in conversations] for name in ("turns", "tool_calls", "tool_errors")}
    counts |= {f"ended_by_{end}": [float(c.ended_by == end) for c in conversations] for end in ENDINGS}
    rewards = None if environment_rewards is None else torch.tensor(checked(environment_rewards, "environment", N), device=device)
    return Samples(responses.to(device), response_mask.to(device), torch.tensor([c.contains_eos for c in conversations], device=device),
                   sampler_logprobs=logprobs.to(device) if sampler_logprobs else None, policy_mask=policy_mask.to(device), environment_rewards=rewards,
                   episode={name: torch.tensor(values, device=device) for name, values in counts.items()})  # fmt: skip


class MultiTurnRollout:
    """The policy in conversation with an environment or tools (`--model.environment`, `--model.tools`), each turn sampled
    by the decode loop of lit_rlhf/generation.py.

    Each policy turn's sampled ids are kept as sampled (its `policy_mask`); the observation that answers it
    (lit_rlhf/environments.py) is rendered with the chat template's own markers and its ids appended, never tokenizing
    the conversation again. Limits per rollout: `max_turns` policy turns, `response_length` tokens per turn,
    `max_rollout_tokens` response tokens in all (turns and observations), `environment_timeout` seconds per call;
    what ended each rollout is counted (`environments.ENDINGS`). The environment's worker process lives for one
    `sample`. Each turn is decoded from the whole conversation (no KV cache kept between turns)."""

    sampler_logprobs = False  # the policy samples its turns itself: the trainer's log-probs are the sampler's

    def __init__(self, module):
        if sharded(module._trainer):  # each process would take its own number of turns: a collective forward would hang
            raise UserError("--model.environment and --model.tools sample with the whole policy in each process: not with parameters"
                            " sharded over processes (FSDP, DeepSpeed ZeRO-3); use DDP")  # fmt: skip
        hp = module.hparams
        self.module, self.worker = module, SupervisedWorker("environment", hp.environment_timeout)
        self.sessions = sessions(hp.environment, hp.tools, self.worker)

    def sync(self, policy: nn.Module) -> None:
        """Nothing to send: the engine samples from the policy's own weights."""

    def sample(self, prompts: Batch, k: int, max_new_tokens: int, temperature: float) -> Samples:
        """`k` conversations from each prompt of `prompts` (B, P), each policy turn at most `max_new_tokens` tokens: responses,
        response_mask, policy_mask (B * k, R), contains_eos, the environment's rewards and the `episode` counts (B * k,)."""
        hp, B = self.module.hparams, len(prompts["input_ids"])
        prompt_ids = [row[mask.bool()].tolist() for row, mask in zip(prompts["input_ids"], prompts["attention_mask"]) for _ in range(k)]
        texts = [text for text in prompts.get("prompt_text", [""] * B) for _ in range(k)]
        rows = [{name: values[i // k] for name, values in prompts.get("columns", {}).items()} for i in range(B * k)]
        conversations = [Conversation() for _ in range(B * k)]
        try:
            self.sessions.start(texts, rows)
            for _ in range(hp.max_turns):
                going = [i for i, c in enumerate(conversations) if c.ended_by is None]
                if not going:
                    break
                allowances = [min(max_new_tokens, hp.max_rollout_tokens - len(conversations[i].ids)) for i in going]
                turns = self.policy_turns([prompt_ids[i] + conversations[i].ids for i in going], allowances, temperature, prompts["input_ids"].device)
                for i, allowance, (ids, logprobs) in zip(going, allowances, turns):
                    self.answered(i, conversations[i], ids, logprobs, cut_by_budget=allowance < max_new_tokens)
            rewards = self.sessions.rewards()
        finally:
            self.worker.close()
        failed = [c.error for c in conversations if c.error is not None]
        if failed:
            rank_zero_warn(f"--model.environment {hp.environment}: {len(failed)} of {len(conversations)} rollouts ended by a failed call (first: {failed[0]})")
        return conversation_samples(conversations, self.module.tokenizer.pad_token_id, rewards, prompts["input_ids"].device,
                                    sampler_logprobs=self.sampler_logprobs)  # fmt: skip

    def policy_turns(self, contexts: list[list[int]], allowances: list[int], temperature: float, device) -> list[tuple[list[int], None]]:
        """One policy turn after each of `contexts` (prompt + conversation so far): its sampled ids, up to and including
        its EOS, at most its allowance (and no sampler log-probs)."""
        tokenizer = self.module.tokenizer
        batch = collate_prompts([{"prompt": ids} for ids in contexts], tokenizer.pad_token_id)  # left-padded (n, L)
        batch = {key: batch[key].to(device) for key in ("input_ids", "attention_mask")}
        responses, mask, _ = generate(self.module.model, batch, tokenizer, max(allowances), temperature, min_new_tokens=1, engine="hf")
        return [(row[row_mask.bool()].tolist()[:allowance], None) for row, row_mask, allowance in zip(responses, mask, allowances)]

    def answered(self, i: int, conversation: Conversation, ids: list[int], logprobs: Optional[list[float]], cut_by_budget: bool) -> None:
        """Rollout `i`'s `conversation` after the policy's turn `ids` (the sampler's `logprobs` of them, or None; `cut_by_budget`:
        the turn was allowed fewer than `response_length` tokens): ended, saying by what, or the observation that answers it appended."""
        hp, tokenizer = self.module.hparams, self.module.tokenizer
        conversation.add(ids, sampled=True, logprobs=logprobs)
        conversation.turns += 1
        conversation.contains_eos = ids[-1] == tokenizer.eos_token_id
        if not conversation.contains_eos:
            conversation.ended_by = "max_rollout_tokens" if cut_by_budget else "response_length"
            return
        reply = self.sessions.step(i, self.module.decode(ids))
        conversation.tool_calls, conversation.tool_errors = conversation.tool_calls + reply.tool_calls, conversation.tool_errors + reply.tool_errors
        if reply.error is not None:
            conversation.ended_by, conversation.error = "environment_error", reply.error
        elif reply.observation is None:
            conversation.ended_by = "environment"
        elif conversation.turns == hp.max_turns:
            conversation.ended_by = "max_turns"
        else:
            observation = tokenize(tokenizer, observation_text(tokenizer, reply.observation, reply.role))
            if len(conversation.ids) + len(observation) >= hp.max_rollout_tokens:  # no token left for the next turn
                conversation.ended_by = "max_rollout_tokens"
            else:
                conversation.add(observation, sampled=False)


class VLLMMultiTurnRollout(MultiTurnRollout):
    """The multi-turn engine with each policy turn sampled by vLLM (`VLLMRollout`'s engine, holding the longest prompt
    + `max_rollout_tokens`), sent the policy's weights before every rollout; its log-probs of the policy's tokens are
    returned beside them (0 on the observations)."""

    sampler_logprobs = True

    def __init__(self, module):
        super().__init__(module)
        self.vllm = VLLMRollout(module, response_tokens=module.hparams.max_rollout_tokens)

    def sync(self, policy: nn.Module) -> None:
        self.vllm.sync(policy)

    def policy_turns(self, contexts: list[list[int]], allowances: list[int], temperature: float, device) -> list[tuple[list[int], list[float]]]:
        """One policy turn after each of `contexts`, sampled by vLLM: its ids up to and including its EOS, at most its
        allowance, and vLLM's log-probs of them."""
        responses, mask, _, logprobs = self.vllm.sampled_ids(contexts, 1, max(allowances), temperature)
        return [(row[m.bool()].tolist()[:allowance], lp[m.bool()].tolist()[:allowance]) for row, m, lp, allowance in zip(responses, mask, logprobs, allowances)]


def resolved_engine(hp) -> type:
    """The engine class of the `--model.*` flags `hp`: `rollout_engine` (a `ROLLOUT_ENGINES` name or `file.py:Class`);
    whenever `environment` or `tools` is given, `multi_turn` (`hf`, the default, gives way to it) or with `vllm`
    `multi_turn_vllm`; checked."""
    multi_turn = bool(hp.environment or hp.tools)
    if hp.environment and hp.tools:
        raise UserError("--model.environment and --model.tools: give one (an environment answers every turn itself; it may call functions of its own)")
    if multi_turn and hp.rollout_engine not in ("hf", "vllm", "multi_turn", "multi_turn_vllm"):
        raise UserError(f"--model.environment and --model.tools run on the multi_turn engine (hf or vllm), not --model.rollout_engine {hp.rollout_engine}")
    if hp.rollout_engine in ("multi_turn", "multi_turn_vllm") and not multi_turn:
        raise UserError(f"--model.rollout_engine {hp.rollout_engine} needs --model.environment (a class of your own) or --model.tools (functions)")
    if multi_turn:
        return ROLLOUT_ENGINES["multi_turn_vllm" if "vllm" in hp.rollout_engine else "multi_turn"]
    return resolve(hp.rollout_engine, ROLLOUT_ENGINES, "--model.rollout_engine")


def summary(engine: type) -> str:
    """What `--help` says of a built-in engine: the first paragraph of its docstring, on one line, without its full stop."""
    text = " ".join(engine.__doc__.split("\n\n")[0].split()).rstrip(".")
    return text[0].lower() + text[1:]


#: `--model.rollout_engine` name -> engine class
ROLLOUT_ENGINES: dict[str, type] = {"hf": HFRollout, "vllm": VLLMRollout, "multi_turn": MultiTurnRollout, "multi_turn_vllm": VLLMMultiTurnRollout}
