"""Advantage estimators: one function each, and the table `--model.advantage_estimator` reads.

An estimator is called with the keyword arguments it declares out of `ESTIMATOR_ARGUMENTS`:

    rewards             (N, T) per-token rewards: the KL penalty `-kl_coef * KL_t` (none with
                        `kl_in_loss`), plus the response's score on its last token
    mask                (N, T) 1 on the policy's own response tokens (a multi-turn rollout's observation
                        tokens are 0: attended, never credited)
    values              (N, T) the value model's V(s_t) (declaring it loads and trains a value model)
    k                   responses per prompt: rows i*k .. i*k + k - 1 answer prompt i
    gamma, lam          the module's GAE flags
    sum_over_processes  sums a tensor over the run's processes, for statistics of the global batch

and returns `(advantages, returns)`: advantages (N, T), 0 off the mask; returns (N, T), the value
model's targets, or None without a value model. The math lives in `ops.py`.
"""

from dataclasses import dataclass, replace
from typing import Callable, Literal, Optional

import torch

from lit_rlhf.errors import UserError
from lit_rlhf.ops import gae, grpo_advantages, masked_whiten, rloo_advantages
from lit_rlhf.plugins import check_shape, declared_arguments, resolve, with_hyperparameters

ESTIMATOR_ARGUMENTS = ("rewards", "mask", "values", "k", "gamma", "lam", "sum_over_processes")
ESTIMATOR_CONTRACT = (
    "an advantage estimator is called with any of the keyword arguments " + ", ".join(ESTIMATOR_ARGUMENTS)
    + " that it declares and returns (advantages, returns or None) (lit_rlhf/estimators.py)"
)


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator and how the update uses it.

    function: the estimator (module docstring).
    paper: where it comes from, for `--help`.
    groups: it compares the k responses to one prompt, so `num_generations` must be 2 or more.
    aggregation: how the per-token policy losses become one (`losses.aggregate_token_losses`):
        `token_mean`, `sequence_mean` or `constant`.
    kl_in_loss: where its paper puts the KL to the reference, the default of `--model.kl_in_loss`: false, a
        per-token penalty in the reward; true, a k3 term in the loss.
    """

    function: Callable
    paper: str
    groups: bool = False
    aggregation: Literal["token_mean", "sequence_mean", "constant"] = "token_mean"
    kl_in_loss: bool = False


def resolved_estimator(name: str, args: Optional[dict] = None) -> tuple[Estimator, tuple[str, ...]]:
    """The estimator `--model.advantage_estimator name` (an `ESTIMATORS` entry, or the user's own function or
    `Estimator`, a plain function with the defaults of the record) with its hyperparameters `args`
    (`--model.estimator_args`) bound, and the arguments it declares, checked."""
    entry = resolve(name, ESTIMATORS, "--model.advantage_estimator")
    estimator = entry if isinstance(entry, Estimator) else Estimator(entry, paper=name)
    arguments = declared_arguments(estimator.function, ESTIMATOR_ARGUMENTS, "--model.advantage_estimator", ESTIMATOR_CONTRACT)
    return replace(estimator, function=with_hyperparameters(estimator.function, ESTIMATOR_ARGUMENTS, args, "--model.estimator_args")), arguments


def checked_estimate(estimate, name: str, shape: torch.Size) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """What the estimator `name` (`--model.advantage_estimator`) returned for rewards of `shape` (N, T), if it keeps
    the contract `(advantages (N, T), returns (N, T) or None)`; else a UserError naming it and the expected shapes."""
    plugin = f"--model.advantage_estimator {name}"
    if not (isinstance(estimate, (tuple, list)) and len(estimate) == 2):
        raise UserError(f"{plugin} returned a {type(estimate).__name__} where it must return (advantages, returns or None), each of"
                        f" shape (N, T), here {tuple(shape)}")  # fmt: skip
    advantages, returns = estimate
    check_shape(advantages, shape, plugin, "the (N, T) advantages first")
    if returns is not None:
        check_shape(returns, shape, plugin, "the (N, T) returns (or None) second")
    return advantages, returns


def sequence_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each response's total reward: its score plus its summed KL penalty. (N, T) -> (N,)"""
    return (rewards * mask).sum(1)


def ppo_gae(rewards, mask, values, gamma: float, lam: float, sum_over_processes):
    """PPO (Huang et al. 2024): GAE(gamma, lambda) against the value model, whitened over the global batch;
    returns `A + V` are the value targets."""
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    return masked_whiten(advantages, mask, sum_over_processes=sum_over_processes) * mask, returns


def rloo(rewards, mask, k: int):
    """RLOO (Ahmadian et al. 2024): a response's reward minus the mean reward of the other k - 1 responses
    to its prompt, on every token of the response."""
    return rloo_advantages(sequence_rewards(rewards, mask), k)[:, None] * mask, None


def grpo(rewards, mask, k: int):
    """GRPO (Shao et al. 2024): a response's reward minus its group's mean, over the group's std, on every token."""
    return grpo_advantages(sequence_rewards(rewards, mask), k, scale_by_std=True)[:, None] * mask, None


def dr_grpo(rewards, mask, k: int):
    """Dr. GRPO (Liu et al. 2025): a response's reward minus its group's mean, no std division."""
    return grpo_advantages(sequence_rewards(rewards, mask), k, scale_by_std=False)[:, None] * mask, None


def reinforce_pp(rewards, mask, sum_over_processes):
    """REINFORCE++ (Hu 2025): each token's sum of future rewards (gamma 1), whitened over the global batch; no
    critic (GAE with V = 0 and lambda = 1)."""
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)  # (N, T)
    return masked_whiten(returns, mask, sum_over_processes=sum_over_processes) * mask, None


#: `--model.advantage_estimator` name -> Estimator. PPO, RLOO and REINFORCE++ put the KL in the reward, GRPO
#: puts k3 in the loss; Dr. GRPO changes GRPO's normalisations only, so keeps GRPO's KL.
ESTIMATORS = {
    "gae": Estimator(ppo_gae, "PPO with a value model, Huang et al. 2024"),
    "rloo": Estimator(rloo, "RLOO, Ahmadian et al. 2024", groups=True),
    "grpo": Estimator(grpo, "GRPO, Shao et al. 2024", groups=True, aggregation="sequence_mean", kl_in_loss=True),
    "dr_grpo": Estimator(dr_grpo, "Dr. GRPO, Liu et al. 2025", groups=True, aggregation="constant", kl_in_loss=True),
    "reinforce_pp": Estimator(reinforce_pp, "REINFORCE++, Hu 2025"),
}

