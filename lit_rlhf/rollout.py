"""What one RL step samples, everything its update reads, and what is logged of it."""

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from lit_rlhf.errors import UserError
from lit_rlhf.losses import truncated_importance_weights
from lit_rlhf.ops import IGNORE_INDEX, flat_groups, masked_mean
from lit_rlhf.rewards import reward_stats
from lit_rlhf.rollout_engines import Samples

Batch = dict[str, torch.Tensor]  # input_ids, attention_mask, labels: (N, P + R), prompts left-padded


def joined(prompts: dict[str, torch.Tensor], samples: Samples, k: int) -> dict[str, torch.Tensor]:
    """Each of the left-padded prompts `input_ids`, `attention_mask` (B, P), k times, followed by its sampled response:
    `input_ids`, `attention_mask` and `labels` (B * k, P + R), the labels the response tokens (IGNORE_INDEX elsewhere)."""
    input_ids = torch.cat([prompts["input_ids"].repeat_interleave(k, 0), samples.responses], 1)
    attention_mask = torch.cat([prompts["attention_mask"].repeat_interleave(k, 0), samples.response_mask], 1)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, : prompts["input_ids"].shape[1]] = IGNORE_INDEX  # only response tokens are scored
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class Rollout:
    """The samples of one step. N = B * k rows: rows i*k .. i*k + k - 1 answer prompt i. P prompt tokens
    (left-padded), R response tokens (cut after the first EOS, right-padded).

    Two masks over the R response tokens: `response_mask` what the policy attends to, `policy_mask` what it sampled
    and is trained on. They differ in a multi-turn rollout only, whose observation tokens (a tool's or an
    environment's turn) are attended but have no policy loss, KL, entropy statistic, value or advantage."""

    input_ids: torch.Tensor  # (N, P + R) prompt + response
    attention_mask: torch.Tensor  # (N, P + R)
    labels: torch.Tensor  # (N, P + R) the response tokens; IGNORE_INDEX on the prompt and padding
    response_mask: torch.Tensor  # (N, R) float: 1 on the response tokens up to and including the first EOS (observations too)
    contains_eos: torch.Tensor  # (N,) bool
    logprobs: torch.Tensor  # (N, R) under the policy that sampled them, at the sampling temperature
    entropies: torch.Tensor  # (N, R) the exact entropy of the distribution each token was drawn from (same temperature)
    ref_logprobs: Optional[torch.Tensor]  # (N, R) the same under the reference; None without one (kl_coef 0)
    scores: torch.Tensor  # (N,) the reward of each response (minus the missing-EOS penalty)
    policy_mask: Optional[torch.Tensor] = None  # (N, R) float: 1 on the policy's own sampled tokens; None: response_mask
    values: Optional[torch.Tensor] = None  # (N, R) V(s_t) before each response token; with a value model only
    source_scores: Optional[torch.Tensor] = None  # (N, F) each reward source's score (rewards.Rewards), nan where a function returned None
    sampler_logprobs: Optional[torch.Tensor] = None  # (N, R) under the engine that sampled (vLLM); None: the policy itself
    prompt_text: Optional[list[str]] = None  # (N,) the user's prompt each response answers
    episode: Optional[dict[str, torch.Tensor]] = None  # name -> (N,) a multi-turn engine's counts (Samples.episode)
    # filled in by `compute_advantages`
    kl: Optional[torch.Tensor] = None  # (N, R) per-token KL estimate to the reference; None without one
    non_score_reward: Optional[torch.Tensor] = None  # (N, R) -kl_coef * kl
    advantages: Optional[torch.Tensor] = None  # (N, R), 0 off the response
    returns: Optional[torch.Tensor] = None  # (N, R) the value model's targets; with a value model only

    def __post_init__(self):
        self.policy_mask = self.response_mask if self.policy_mask is None else self.policy_mask

    @classmethod
    def of(cls, answered: Batch, samples: Samples, prompt_text: list[str], **scored: Optional[torch.Tensor]) -> "Rollout":
        """The rollout of the engine's `samples`, `answered` (`joined`) their prompts followed by them, with what the
        step `scored` of them (`logprobs`, `entropies`, `ref_logprobs`, `scores`, `values`, `source_scores`)."""
        return cls(**answered, response_mask=samples.response_mask.float(), policy_mask=samples.policy_mask.float(), contains_eos=samples.contains_eos,
                   sampler_logprobs=samples.sampler_logprobs, episode=samples.episode, prompt_text=prompt_text, **scored)  # fmt: skip

    @property
    def context_length(self) -> int:
        """P: where the responses start."""
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    def model_inputs(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """`input_ids`, `attention_mask` and `labels` of `rows`: a batch for the forward functions."""
        return {"input_ids": self.input_ids[rows], "attention_mask": self.attention_mask[rows], "labels": self.labels[rows]}

    def importance_weights(self, rows: torch.Tensor, cap: Optional[float]) -> Optional[torch.Tensor]:
        """(n, R) the truncated importance weights of `rows` (`losses.truncated_importance_weights`, capped at `cap`) for
        samples of another engine than the trainer (vLLM); None without its log-probs or a cap."""
        if self.sampler_logprobs is None or cap is None:
            return None
        return truncated_importance_weights(self.logprobs[rows], self.sampler_logprobs[rows], cap)

    def rows(self, rows: list[int]) -> "Rollout":
        """The rollout of `rows` only, in that order (every field that is set)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.input_ids.device)

        def picked(value):
            if isinstance(value, dict):
                return {name: column[index] for name, column in value.items()}
            return [value[i] for i in rows] if isinstance(value, list) else value[index]

        return replace(self, **{f.name: picked(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None})


#: how `concatenated` pads the fields: the (N, P + R) ones left of the prompt and right of the response with their pad
#: value, the (N, R) ones right of the response with 0; the others ((N,), (N, F), lists) are stacked as they are
SEQUENCE_PADDING = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}
TOKEN_FIELDS = ("response_mask", "policy_mask", "logprobs", "entropies", "ref_logprobs", "values", "sampler_logprobs", "kl", "non_score_reward",
                "advantages", "returns")  # fmt: skip


def concatenated(rollouts: list[Rollout]) -> Rollout:
    """The rows of `rollouts` (e.g. several rounds of sampling) as one rollout: each prompt left-padded to the longest
    prompt P, each response right-padded to the longest response R, so (N_i, P_i + R_i) fields become (sum N_i,
    P + R) and (N_i, R_i) fields (sum N_i, R). The rollouts set the same fields."""
    P, R = max(r.context_length for r in rollouts), max(r.response_mask.shape[1] for r in rollouts)

    def joined(name: str, values: list):
        if name in SEQUENCE_PADDING:
            widths = [(P - r.context_length, R - r.response_mask.shape[1]) for r in rollouts]
            return torch.cat([F.pad(value, width, value=SEQUENCE_PADDING[name]) for value, width in zip(values, widths)])
        if name in TOKEN_FIELDS:
            return torch.cat([F.pad(value, (0, R - value.shape[1])) for value in values])
        if isinstance(values[0], dict):
            return {column: torch.cat([value[column] for value in values]) for column in values[0]}
        return [v for value in values for v in value] if isinstance(values[0], list) else torch.cat(values)

    names = [f.name for f in fields(Rollout) if getattr(rollouts[0], f.name) is not None]
    return replace(rollouts[0], **{name: joined(name, [getattr(r, name) for r in rollouts]) for name in names})


def in_chunks(function: Callable[[Batch, int], torch.Tensor], batch: Batch, context_length: int, chunk_rows: int) -> torch.Tensor:
    """`function(batch's rows, context_length)` over `batch`, `chunk_rows` rows per call (`--model.rollout_batch_size`),
    concatenated. -> (N, ...)"""
    chunks = torch.arange(len(batch["input_ids"]), device=batch["input_ids"].device).split(chunk_rows)
    return torch.cat([function({key: value[r] for key, value in batch.items()}, context_length) for r in chunks])


def dynamically_sampled(rollout: Rollout, k: int, max_rounds: int, more: Iterator[Rollout],
                        sum_over_processes: Callable[[torch.Tensor], torch.Tensor]) -> tuple[Rollout, dict[str, torch.Tensor]]:  # fmt: skip
    """DAPO's dynamic sampling (Yu et al. 2025, sec. 3.2): the B groups of k responses of `rollout` with a signal (scores
    not all equal), and while fewer than B (in any process: all sample the same number of rounds), those of the next
    rollouts of `more` (sampled when asked for), at most `max_rounds` more; then the first B groups with a signal, flat
    ones if short. Also the statistics `rollout/sampling_rounds` and `rollout/flat_group_share` (of every group sampled)."""
    B, rollouts = len(rollout.scores) // k, [rollout]
    for _ in range(max_rounds):
        short = sum(int((~flat_groups(r.scores, k)).sum()) for r in rollouts) < B
        if not sum_over_processes(torch.tensor(float(short), device=rollout.scores.device)):
            break
        next_rollout = next(more, None)
        if next_rollout is None:  # no batch left
            break
        rollouts.append(next_rollout)
    sampled = concatenated(rollouts)
    flat = flat_groups(sampled.scores, k)  # (G,)
    groups = (torch.cat([(~flat).nonzero(), flat.nonzero()])[:B, 0] * k)[:, None] + torch.arange(k, device=flat.device)  # (B, k)
    stats = {"rollout/sampling_rounds": torch.tensor(float(len(rollouts)), device=flat.device), "rollout/flat_group_share": flat.float().mean()}
    return sampled.rows(groups.flatten().tolist()), stats


def check_prompt_batches(datamodule, stage: str, k: int, num_minibatches: int, gradient_accumulation_steps: int) -> None:
    """Refuse a DataModule that does not give prompts and, to fit, a batch of prompts (per process) that does not split
    evenly: its groups of `k` responses into `num_minibatches` minibatches, each minibatch's rows into
    `gradient_accumulation_steps` micro-batches."""
    if datamodule is not None and datamodule.hparams.mode != "prompts":
        raise UserError("PPO reads prompts only: set --data.mode prompts")
    if datamodule is None or stage != "fit":
        return
    batch_size, steps = datamodule.hparams.batch_size, num_minibatches * gradient_accumulation_steps
    multiple = math.lcm(num_minibatches, steps // math.gcd(steps, k))  # B % multiple == 0 <=> both splits are even
    if batch_size % multiple:
        raise UserError(
            f"--data.batch_size {batch_size} prompts x --model.num_generations {k} responses do not split into"
            f" --model.num_minibatches {num_minibatches} minibatches of whole groups of {k}, each of"
            f" --model.gradient_accumulation_steps {gradient_accumulation_steps} equal micro-batches:"
            f" use a batch size that is a multiple of {multiple}"
        )


class Stopwatch:
    """Wall time of the named phases of a step: `with stopwatch("update"): ...` adds to `seconds["update"]` (several
    rounds of generation add up); `seconds.clear()` starts the next step."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


def step_stats(rollout: Rollout, reward_names: list[str], k: int, ppo_epochs: int, seconds: dict[str, float]) -> dict[str, torch.Tensor]:
    """The TensorBoard scalars of one step's `rollout` (after `compute_advantages`): `objective/*` (no `objective/kl`
    without a reference; `objective/entropy` each response's summed per-token entropy, as TRL's scale, averaged over
    responses, `objective/entropy_per_token` the mean over the policy's tokens), `rewards/*` (`rewards.reward_stats` of the
    sources `reward_names`, k responses per prompt),
    `rollout/logprob_diff` (with the sampler's log-probs), a multi-turn engine's counts `rollout/<name>` (means over
    responses: `turns`, `tool_calls`, `tool_errors`, `ended_by_<ending>` shares) and where the wall time went, `time/*`, from the `seconds`
    of the phases `generation`, `rollout` and `update` (generated tokens: the policy's own; update tokens: real prompt +
    response tokens of every epoch). Per-token statistics count the policy's tokens only (`policy_mask`)."""
    scores, non_score, policy_mask = rollout.scores, rollout.non_score_reward.sum(1), rollout.policy_mask  # (N,), (N,), (N, R)
    stats = {
        "time/generation": seconds["generation"], "time/rollout": seconds["rollout"], "time/update": seconds["update"],
        "time/generated_tokens_per_s": policy_mask.sum() / seconds["generation"],
        "time/update_tokens_per_s": ppo_epochs * rollout.attention_mask.sum() / seconds["update"],
        **({"objective/kl": rollout.kl.sum(1).mean()} if rollout.kl is not None else {}),
        "objective/entropy": (rollout.entropies * policy_mask).sum(1).mean(),
        "objective/entropy_per_token": masked_mean(rollout.entropies, policy_mask),
        "objective/non_score_reward": non_score.mean(),
        "objective/rlhf_reward": (scores + non_score).mean(),
        "objective/scores": scores.mean(),
        "objective/eos_share": rollout.contains_eos.float().mean(),
    }  # fmt: skip
    stats |= reward_stats(rollout.source_scores, reward_names, scores, k)
    stats |= {f"rollout/{name}": value.float().mean() for name, value in (rollout.episode or {}).items()}
    if rollout.sampler_logprobs is not None:  # how far the engine that sampled is from the trainer, per token
        stats["rollout/logprob_diff"] = masked_mean((rollout.logprobs - rollout.sampler_logprobs).abs(), policy_mask)
    return stats


def samples_table(prompts: list[str], rollout: Rollout, decode: Callable[[list[int]], str], rows: int = 8) -> str:
    """A markdown table of the first `rows` responses of `rollout`: the user's prompt (one per response), the response
    (`decode`d) and its score."""
    P = rollout.context_length
    cell = lambda text: text.replace("\n", " ").replace("|", "\\|")  # noqa: E731
    lines = [
        f"| {cell(prompt)} | {cell(decode(seq[P:]))} | {score:.3f} |"
        for prompt, seq, score in zip(prompts[:rows], rollout.input_ids[:rows].tolist(), rollout.scores[:rows].tolist())
    ]
    return "\n".join(["| prompt | response | score |", "| --- | --- | --- |", *lines])
