"""Policy losses of the RL update: one function each, and the table `--model.policy_loss` reads.

A policy loss is called with the keyword arguments it declares out of `POLICY_LOSS_ARGUMENTS`:

    logprobs                      (B, T) log-probs of the response tokens under the policy being trained
    old_logprobs                  (B, T) the same under the policy that sampled them (no gradient)
    advantages                    (B, T) advantages, 0 off the response
    mask                          (B, T) 1 on the tokens the loss counts: the policy's response tokens (not a
                                  multi-turn rollout's observations), less those of truncated responses with
                                  `mask_truncated_completions`
    cliprange_low, cliprange_high the module's clip ranges: a ratio is clipped to [1 - low, 1 + high]
    weights                       (B, T) per-token weights without gradient (truncated importance sampling
                                  of vLLM's samples), or None

and returns `(losses, stats)`: the per-token losses (B, T), which the module aggregates over the mask
(`aggregate_token_losses`, `--model.loss_aggregation`), and a dict of () statistics without gradient,
`clipfrac`, `approxkl` and `ratio` logged as `policy/clipfrac_avg`, `policy/approxkl_avg` and `val/ratio`,
any other key as `policy/<key>`.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from lit_rlhf.errors import UserError
from lit_rlhf.plugins import check_shape, declared_arguments, resolve, with_hyperparameters

POLICY_LOSS_ARGUMENTS = ("logprobs", "old_logprobs", "advantages", "mask", "cliprange_low", "cliprange_high", "weights")
POLICY_LOSS_CONTRACT = (
    "a policy loss is called with any of the keyword arguments " + ", ".join(POLICY_LOSS_ARGUMENTS)
    + " that it declares and returns (per-token losses (B, T), a dict of statistics) (lit_rlhf/policy_losses.py)"
)
#: the names a policy loss's statistics are logged under (any other `name` as `policy/<name>`)
POLICY_STATS = {"clipfrac": "policy/clipfrac_avg", "approxkl": "policy/approxkl_avg", "ratio": "val/ratio"}


def token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the tokens of `mask`, 0 if it has none (every response truncated and masked). (B, T) or
    (B, 1), (B, T) -> ()"""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def aggregate_token_losses(losses: torch.Tensor, mask: torch.Tensor, aggregation: str = "token_mean", length: int = 1) -> torch.Tensor:
    """One loss from per-token losses: how each response's tokens are weighted. (B, T), (B, T) -> ()

    - `token_mean`: mean over every masked token of the batch (PPO as in Huang et al. 2024, RLOO,
      REINFORCE++, DAPO's token-level loss): a long response weighs more;
    - `sequence_mean`: the mean over each response's tokens, then over responses (GRPO): a token of a
      short response weighs more;
    - `constant`: each response's token sum divided by the constant `length` (e.g. the response length),
      then the mean over responses (Dr. GRPO): no length bias either way.

    A response with no masked token (`mask_truncated_completions`) adds 0 and still counts as a response.
    """
    if aggregation == "token_mean":
        return token_mean(losses, mask)
    if aggregation == "sequence_mean":
        return ((losses * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if aggregation == "constant":
        return (losses * mask).sum(1).mean() / length
    raise ValueError(f"unknown loss aggregation {aggregation!r}; use token_mean, sequence_mean or constant")


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, cliprange_low: float, cliprange_high: float):
    """PPO's pessimistic surrogate (Schulman et al. 2017, eq. 7) as a loss, `max(-A r, -A clip(r, 1 - low, 1 + high))`,
    and where the clipped term is the larger (no gradient flows there). (B, T) or (B, 1) -> the same, twice"""
    losses = -advantages * ratio
    clipped_losses = -advantages * ratio.clamp(1.0 - cliprange_low, 1.0 + cliprange_high)
    return torch.max(losses, clipped_losses), clipped_losses > losses


def weighted(losses: torch.Tensor, weights) -> torch.Tensor:
    """`losses` (B, T) times the per-token `weights` (B, T) without their gradient; unchanged if None."""
    return losses if weights is None else losses * weights.detach()


def policy_stats(log_ratio: torch.Tensor, ratio: torch.Tensor, clipped: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """`clipfrac` (share of tokens where `clipped`), `approxkl` (`0.5 mean((log r_t)^2)` of the token ratios
    `log_ratio` (B, T)) and `ratio` (mean of the ratio the loss uses, (B, T) or one per response (B, 1)) over the
    tokens of `mask`, without gradient."""
    stats = {"clipfrac": token_mean(clipped.float(), mask), "approxkl": 0.5 * token_mean(log_ratio**2, mask), "ratio": token_mean(ratio, mask)}
    return {name: value.detach() for name, value in stats.items()}


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, cliprange_low: float = 0.2, cliprange_high: float = 0.2, weights=None):
    """PPO (Schulman et al. 2017, eq. 7): each token's ratio `r_t = pi / pi_old`, clipped, `max(-A_t r_t, -A_t
    clip(r_t, 1 - low, 1 + high))`; with `cliprange_high` > `cliprange_low`, DAPO's clip-higher (Yu et al. 2025,
    eq. 10): a token with a positive advantage may gain more probability before its gradient is cut."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    losses, clipped = clipped_surrogate(ratio, advantages, cliprange_low, cliprange_high)
    return weighted(losses, weights), policy_stats(log_ratio, ratio, clipped, mask)


def gspo(logprobs, old_logprobs, advantages, mask, cliprange_low: float, cliprange_high: float, weights=None):
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", eqs. 5 and 7): one importance ratio per
    response, the geometric mean of its tokens' ratios `s_i = exp(mean_t log(pi / pi_old))`, clipped per response:
    `max(-A_i s_i, -A_i clip(s_i, 1 - low, 1 + high))` on each of its tokens (aggregated `sequence_mean`, the
    paper's mean over responses). A_i is the response's mean advantage over its tokens (the group estimators
    give every token the same). The paper's clip ranges are about 1000 times smaller than PPO's (3e-4 low, 4e-4 high)."""
    log_ratio = logprobs - old_logprobs
    lengths = mask.sum(1, keepdim=True).clamp(min=1)  # (B, 1)
    sequence_ratio = torch.exp((log_ratio * mask).sum(1, keepdim=True) / lengths)  # (B, 1)
    sequence_advantages = (advantages * mask).sum(1, keepdim=True) / lengths  # (B, 1)
    losses, clipped = clipped_surrogate(sequence_ratio, sequence_advantages, cliprange_low, cliprange_high)
    return weighted(losses.expand_as(logprobs), weights), policy_stats(log_ratio, sequence_ratio, clipped, mask)


def cispo(logprobs, old_logprobs, advantages, mask, cliprange_low: float, cliprange_high: float, weights=None):
    """CISPO (MiniMax-M1, MiniMax 2025, eq. 4): REINFORCE weighted by the clipped importance ratio without its
    gradient, `-sg(clip(r_t, 1 - low, 1 + high)) A_t log pi_t`. PPO's clip cuts a token's gradient once its ratio
    leaves the range; here only the weight is clipped, so every token keeps a gradient. The paper bounds the
    weight above only: `--model.cliprange 1` drops the lower bound. Its loss values are not PPO's (they hold
    log pi), its gradients are: at r = 1 both are `-A grad log pi`."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    clipped_ratio = ratio.clamp(1.0 - cliprange_low, 1.0 + cliprange_high)
    losses = -clipped_ratio.detach() * advantages * logprobs
    return weighted(losses, weights), policy_stats(log_ratio, ratio, clipped_ratio != ratio, mask)


#: `--model.policy_loss` name -> (function, paper)
POLICY_LOSSES = {
    "ppo": (ppo_policy_loss, "PPO's clipped token ratio, Schulman et al. 2017"),
    "gspo": (gspo, "GSPO, Zheng et al. 2025: one clipped, length-normalised ratio per response"),
    "cispo": (cispo, "CISPO, MiniMax-M1 2025: a clipped, stop-gradient importance weight; every token keeps a gradient"),
}


@dataclass(frozen=True)
class DeclaredPolicyLoss:
    """The policy loss `name` (`--model.policy_loss`): `function`, called with the `arguments` it declares out of those
    the update provides (`POLICY_LOSS_ARGUMENTS`), its result checked (`checked_policy_loss`)."""

    name: str
    function: Callable
    arguments: tuple[str, ...]

    def __call__(self, **provided) -> tuple[torch.Tensor, dict]:
        """(per-token losses (B, T), statistics) of `function` on the `provided` arguments it declares."""
        result = self.function(**{name: provided[name] for name in self.arguments})
        return checked_policy_loss(result, self.name, provided["logprobs"].shape)


def resolved_policy_loss(name: str, args: Optional[dict] = None) -> DeclaredPolicyLoss:
    """The policy loss `--model.policy_loss name`: a `POLICY_LOSSES` entry or the user's own function, its declared
    arguments checked, its hyperparameters `args` (`--model.policy_loss_args`) bound."""
    entry = resolve(name, POLICY_LOSSES, "--model.policy_loss")
    function = entry[0] if isinstance(entry, tuple) else entry
    if not callable(function):
        raise UserError(f"--model.policy_loss {name}: not a function")
    arguments = declared_arguments(function, POLICY_LOSS_ARGUMENTS, "--model.policy_loss", POLICY_LOSS_CONTRACT)
    return DeclaredPolicyLoss(name, with_hyperparameters(function, POLICY_LOSS_ARGUMENTS, args, "--model.policy_loss_args"), arguments)


def checked_policy_loss(result, name: str, shape: torch.Size) -> tuple[torch.Tensor, dict]:
    """What the policy loss `name` (`--model.policy_loss`) returned for log-probs of `shape` (B, T), if it keeps the
    contract `(losses (B, T), stats dict)`; else a UserError naming it and the expected shapes."""
    plugin = f"--model.policy_loss {name}"
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[1], dict)):
        raise UserError(f"{plugin} returned a {type(result).__name__} where it must return (losses, stats): the per-token losses"
                        f" of shape (B, T), here {tuple(shape)}, and a dict of statistics")  # fmt: skip
    losses, stats = result
    check_shape(losses, shape, plugin, "the (B, T) per-token losses first")
    return losses, stats


def logged_policy_stats(stats: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """A policy loss's `stats` under the names they are logged as (`POLICY_STATS`, else `policy/<name>`), as
    tensors on `device` without gradient."""
    return {POLICY_STATS.get(name, f"policy/{name}"): torch.as_tensor(value, device=device).detach() for name, value in stats.items()}
