"""What one RL step samples, and everything its update reads."""

from dataclasses import dataclass
from typing import Optional

import torch

from lit_rlhf.ops import IGNORE_INDEX
from lit_rlhf.rollout_engines import Samples


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
    (left-padded), R response tokens (cut after the first EOS, right-padded)."""

    input_ids: torch.Tensor  # (N, P + R) prompt + response
    attention_mask: torch.Tensor  # (N, P + R)
    labels: torch.Tensor  # (N, P + R) the response tokens; IGNORE_INDEX on the prompt and padding
    response_mask: torch.Tensor  # (N, R) float: 1 on the response tokens up to and including the first EOS
    contains_eos: torch.Tensor  # (N,) bool
    logprobs: torch.Tensor  # (N, R) under the policy that sampled them, at the sampling temperature
    ref_logprobs: Optional[torch.Tensor]  # (N, R) the same under the reference; None without one (kl_coef 0)
    scores: torch.Tensor  # (N,) the reward of each response (minus the missing-EOS penalty)
    generation_seconds: float  # wall time of the sampling
    values: Optional[torch.Tensor] = None  # (N, R) V(s_t) before each response token; with a value model only
    source_scores: Optional[torch.Tensor] = None  # (N, F) each reward source's score (rewards.Rewards), nan where a function returned None
    sampler_logprobs: Optional[torch.Tensor] = None  # (N, R) under the engine that sampled (vLLM); None: the policy itself
    # filled in by `compute_advantages`
    kl: Optional[torch.Tensor] = None  # (N, R) per-token KL estimate to the reference; None without one
    non_score_reward: Optional[torch.Tensor] = None  # (N, R) -kl_coef * kl
    advantages: Optional[torch.Tensor] = None  # (N, R), 0 off the response
    returns: Optional[torch.Tensor] = None  # (N, R) the value model's targets; with a value model only

    @property
    def context_length(self) -> int:
        """P: where the responses start."""
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    def model_inputs(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """`input_ids`, `attention_mask` and `labels` of `rows`: a batch for the forward functions."""
        return {"input_ids": self.input_ids[rows], "attention_mask": self.attention_mask[rows], "labels": self.labels[rows]}
