"""Shared tensor math: token log-probs, masks, grouped-query attention, masked statistics, advantages, schedules. Depends on torch only."""

from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # label of prompt and padding tokens: no loss there


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on the first real token, so left padding does not shift them. (B, T) -> (B, T)"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for any padding side. (B, T) -> (B,)"""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask * positions).argmax(-1)


def grouped_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                            is_causal: bool = False, scale: Optional[float] = None, dropout_p: float = 0.0) -> torch.Tensor:  # fmt: skip
    """SDPA with grouped key/value heads, the KV cache never copied per query head: query (B, H, q, D), key and value
    (B, KV, T, D), H a multiple of KV, query head h reading KV head h // (H / KV). -> (B, H, q, D)

    A decoding step (q = 1, a mask shared by the heads) hands SDPA the H / KV query heads of each KV head as that
    head's query positions: (B, KV, H / KV, D), each key and value read once for all of them. SDPA's own grouping
    (`enable_gqa`), which the other cases take, ran several times slower on single queries (docs/speed.md)."""
    B, H, q, D = query.shape
    KV = key.shape[1]
    if q == 1 and H != KV and not is_causal and (attn_mask is None or attn_mask.shape[1] == 1):
        out = F.scaled_dot_product_attention(query.reshape(B, KV, H // KV, D), key, value, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
        return out.view(B, H, 1, D)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=True)


def label_logps(
    hidden: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, head: Optional[Callable] = None, chunk_tokens: int = 512
) -> torch.Tensor:
    """Log-prob of each label token given the tokens before it; 0 where the label is IGNORE_INDEX.

    Args:
        hidden: (B, T, H) last hidden states, turned into logits by `head` (the LM head); or, with
            `head=None`, (B, T, V) logits.
        labels: (B, T) the sequence's token ids where they are scored, IGNORE_INDEX elsewhere.
        temperature: the logits are divided by it (sampling temperature of PPO rollouts).
        head: (n, H) -> (n, V), e.g. `model.get_output_embeddings()`.
        chunk_tokens: scored positions whose logits exist at once.

    Returns:
        (B, T - 1) in fp32 whatever the input dtype (bf16 under mixed precision): entry t is
        `log p(labels_{t+1} | tokens_<=t)`. The head runs on the scored positions only (no prompt,
        no padding), `chunk_tokens` at a time, and each chunk but the last is recomputed in the
        backward pass instead of being kept: the (B, T, V) logits never exist, and the largest
        temporary is (chunk_tokens, V) in fp32.
    """
    return label_stats(hidden, labels, temperature, head, chunk_tokens, entropies=False)[..., 0]


def label_logps_and_entropies(
    hidden: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, head: Optional[Callable] = None, chunk_tokens: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """`label_logps` and, from the same logits, the entropy `H_t = -sum_v p_v log p_v` of the whole next-token
    distribution (at `temperature`) at each scored position: the exact entropy, not `-log p` of the sampled token.
    Arguments as `label_logps`. -> (B, T - 1), (B, T - 1) fp32, 0 where the label is IGNORE_INDEX."""
    stats = label_stats(hidden, labels, temperature, head, chunk_tokens, entropies=True)  # (B, T - 1, 2)
    return stats[..., 0], stats[..., 1]


def logps_and_entropies(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Each row's log-prob of its `index` token (bit for bit `label_logps`'s) and the entropy `-sum_v p_v log p_v` of
    its distribution. (n, V) fp32, (n,) -> (n, 2)"""
    logps = logits.log_softmax(-1)  # (n, V)
    return torch.stack([-F.cross_entropy(logits, index, reduction="none"), -(logps.exp() * logps).sum(-1)], -1)


def label_stats(
    hidden: torch.Tensor, labels: torch.Tensor, temperature: float, head: Optional[Callable], chunk_tokens: int, entropies: bool
) -> torch.Tensor:
    """The label log-probs (and with `entropies` the entropies) of `label_logps`, the LM head run in chunks on the
    scored positions. -> (B, T - 1, 1), or (B, T - 1, 2) with `entropies`: log-prob, entropy."""
    labels = labels[:, 1:]  # token t + 1 is predicted by position t
    scored = labels != IGNORE_INDEX  # (B, T-1)
    inputs, targets = hidden[:, :-1][scored], labels[scored]  # (N, H or V), (N,)

    def chunk_stats(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # (n, H or V), (n,) -> (n, 1 or 2)
        logits = (x if head is None else head(x)).float()  # (n, V)
        if temperature != 1.0:
            logits = logits / temperature
        if entropies:
            return logps_and_entropies(logits, index)
        # cross_entropy's fused log-softmax: half the time of gather - logsumexp, forward and backward
        return -F.cross_entropy(logits, index, reduction="none")[:, None]

    starts = range(0, len(targets), chunk_tokens)
    # the last chunk's backward runs first: keeping its logits costs one chunk's memory and saves recomputing it
    chunks = [
        (chunk_stats if i == starts[-1] else partial(checkpoint, chunk_stats, use_reentrant=False))(
            inputs[i : i + chunk_tokens], targets[i : i + chunk_tokens]
        )
        for i in starts
    ]
    stats = torch.zeros((*labels.shape, 2 if entropies else 1), dtype=torch.float32, device=hidden.device)
    if chunks:
        stats[scored] = torch.cat(chunks)
    return stats


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is 1. (B, T), (B, T) -> ()"""
    return (x * mask).sum() / mask.sum()


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, sum_over_processes: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
) -> torch.Tensor:
    """`(x - mean) / std` over the masked positions (the mean is kept when `shift_mean` is False). (B, T) -> (B, T)

    The std is the unbiased one. `sum_over_processes` sums a tensor over the processes of a
    multi-process run (an all-reduce): mean and std are then those of the masked positions of every
    process together, as if one process held all the rows. By default, this process's rows only.
    """
    n, total = sum_over_processes(torch.stack([mask.sum(), (x * mask).sum()]))
    mean = total / n
    var = sum_over_processes(((x - mean) ** 2 * mask).sum()) / (n - 1)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def kl_k1(log_ratio: torch.Tensor) -> torch.Tensor:
    """k1 = log r, r = p / q: unbiased, can be negative. (B, T) -> (B, T)"""
    return log_ratio


def kl_k2(log_ratio: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 (log r)^2: biased, never negative, its gradient is that of the KL in expectation. (B, T) -> (B, T)"""
    return 0.5 * log_ratio**2


def kl_k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """k3 = (q / p - 1) - log(q / p): unbiased, never negative. (B, T) -> (B, T)"""
    return torch.expm1(-log_ratio) + log_ratio


def kl_low_var(log_ratio: torch.Tensor) -> torch.Tensor:
    """verl's `low_var_kl`: k3 of the log-ratio clamped to [-20, 20] (no overflow in exp), the result clamped to
    [-10, 10]: a token far from the reference adds at most 10. (B, T) -> (B, T)"""
    return kl_k3(log_ratio.clamp(-20.0, 20.0)).clamp(-10.0, 10.0)


#: `--model.kl_estimator` (reward side) and `--model.kl_loss_estimator` (loss side) name -> (function of the
#: per-token log-ratio log p - log q, where it comes from). Schulman 2020 is "Approximating KL divergence".
KL_ESTIMATORS = {
    "k1": (kl_k1, "Schulman 2020"),
    "k2": (kl_k2, "Schulman 2020; verl's `k2`"),
    "k3": (kl_k3, "Schulman 2020; GRPO (Shao et al. 2024)"),
    "low_var_kl": (kl_low_var, "verl's `low_var_kl`"),
}


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens, by the `estimator` of KL_ESTIMATORS.

    Args:
        logprobs: (B, T) log-probs of the sampled tokens under the policy.
        ref_logprobs: (B, T) their log-probs under the reference.
        estimator: a KL_ESTIMATORS name.

    Returns:
        (B, T) per-token KL estimate.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; use " + ", ".join(KL_ESTIMATORS))
    return KL_ESTIMATORS[estimator][0](logprobs - ref_logprobs)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016) over the policy's tokens.

    Args:
        rewards: (B, T) per-token rewards (0 off the mask).
        values: (B, T) value estimates V(s_t) of the state before each response token.
        mask: (B, T) 1 on the policy's tokens; 0 on padding after the end and, in a multi-turn rollout, on the
            observation tokens between two policy turns.
        gamma: discount; lam: GAE lambda.

    Returns:
        advantages (B, T) and returns = advantages + values (B, T), both 0 off the mask.
        `delta_t = r_t + gamma V_next - V_t`, `A_t = delta_t + gamma lam A_next`, where `next` is the next token of
        the mask: the recursion skips the observation tokens (they are the environment's transition, not steps of
        the policy: no discount, no reward, no value of their own), so the last token of a turn is credited with
        the value of the first token of the next policy turn. V and A are taken as 0 past the last policy token.
    """
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last_advantage = torch.zeros_like(rewards[:, 0])  # (B,) A of the next policy token
    next_values = torch.zeros_like(last_advantage)  # (B,) V of the next policy token
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        advantage = delta + gamma * lam * last_advantage
        policy_token = mask[:, t].bool()
        last_advantage = torch.where(policy_token, advantage, last_advantage)
        next_values = torch.where(policy_token, values[:, t], next_values)
        advantages[:, t] = advantage * mask[:, t]
    return advantages, (advantages + values) * mask


def grouped(scores: torch.Tensor, k: int, estimator: str) -> torch.Tensor:
    """The scores of `estimator` as one row per prompt. (B * k,) -> (B, k); rows g*k .. g*k + k - 1 form group g.

    Raises ValueError unless there are at least 2 samples per prompt (a group of one has no baseline)."""
    if k < 2:
        raise ValueError(f"{estimator} compares the samples of one prompt: it needs k >= 2 samples per prompt, got k={k}")
    if scores.shape[0] % k:
        raise ValueError(f"{estimator}: {scores.shape[0]} scores do not split into groups of k={k}")
    return scores.view(-1, k)


def flat_groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Which groups' k scores are all equal: no signal for a group baseline. (B * k,) -> (B,) bool"""
    groups = scores.view(-1, k)  # (B, k)
    return groups.max(1).values == groups.min(1).values


def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics"): each sample's score minus the mean
    score of the other k - 1 samples of its prompt.

    Args:
        scores: (B * k,) sequence rewards, the k samples of each prompt contiguous.
        k: samples per prompt, at least 2.

    Returns:
        (B * k,) `A_i = r_i - (sum_j r_j - r_i) / (k - 1)`.
    """
    groups = grouped(scores, k, "RLOO")  # (B, k)
    baseline = (groups.sum(1, keepdim=True) - groups) / (k - 1)  # (B, k) mean of the others
    return (groups - baseline).flatten()


def grpo_advantages(scores: torch.Tensor, k: int, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages: GRPO (Shao et al. 2024, "DeepSeekMath") and Dr. GRPO (Liu et al. 2025,
    "Understanding R1-Zero-Like Training").

    Args:
        scores: (B * k,) sequence rewards, the k samples of each prompt contiguous.
        k: samples per prompt, at least 2.
        scale_by_std: True (GRPO): divide by the group's standard deviation (unbiased) plus `eps`;
            False (Dr. GRPO): no division, the score minus the group mean.
        eps: keeps a group whose scores are all equal at advantage 0 instead of 0 / 0.

    Returns:
        (B * k,) `(r_i - mean(r)) / (std(r) + eps)`, or `r_i - mean(r)` without `scale_by_std`.
    """
    groups = grouped(scores, k, "GRPO" if scale_by_std else "Dr. GRPO")  # (B, k)
    advantages = groups - groups.mean(1, keepdim=True)
    if scale_by_std:
        advantages = advantages / (groups.std(1, keepdim=True) + eps)
    return advantages.flatten()


def group_minibatches(num_rows: int, k: int, num_minibatches: int, device=None) -> tuple[torch.Tensor, ...]:
    """Shuffled row indices cut into minibatches of whole groups. -> `num_minibatches` index tensors

    Rows g*k .. g*k + k - 1 are group g (the k samples of one prompt). The groups are shuffled with
    torch's RNG, each keeping its rows together, and split into `num_minibatches` minibatches whose sizes
    differ by one group at most (fewer when there are fewer groups: a short last batch of an epoch).
    With k = 1 this is `randperm(num_rows)` cut into equal parts.
    """
    if num_rows % k:
        raise ValueError(f"{num_rows} rows do not split into groups of k={k}")
    num_groups = num_rows // k
    groups = torch.randperm(num_groups, device=device)  # (G,)
    rows = groups[:, None] * k + torch.arange(k, device=device)  # (G, k)
    return tuple(minibatch.flatten() for minibatch in rows.tensor_split(min(num_minibatches, num_groups)))


def truncate_after_eos(responses: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each response after its first EOS.

    Args:
        responses: (B, T) generated token ids.

    Returns:
        responses (B, T) with every token after the first EOS set to `pad_id`; mask (B, T), 1 up
        to and including the first EOS (everywhere when there is none); contains_eos (B,) bool.
    """
    is_eos = responses == eos_id
    contains_eos = is_eos.any(-1)
    last = torch.where(contains_eos, is_eos.int().argmax(-1), responses.shape[1] - 1)  # (B,)
    mask = (torch.arange(responses.shape[1], device=responses.device) <= last[:, None]).long()
    return responses.masked_fill(mask == 0, pad_id), mask, contains_eos


def linear_warmup_decay(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier at scheduler step `step` (0-based): linear warmup from `1 / warmup_steps`
    to 1 over `warmup_steps` steps, then linear decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def linear_warmup_constant(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate multiplier at scheduler step `step` (0-based): linear warmup from `1 / warmup_steps`
    to 1 over `warmup_steps` steps, then 1 to the end (`total_steps` unused: the signature of
    `linear_warmup_decay`)."""
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0
