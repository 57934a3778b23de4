"""Loss functions: tensors in, tensors out, no models. The policy losses of the RL update: `policy_losses.py`."""

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from lit_rlhf.ops import masked_mean


def reward_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Bradley-Terry loss of a reward model, `-log sigmoid(r_chosen - r_rejected - margin)`.

    Args:
        chosen_rewards: (B,) scores of the chosen completions.
        rejected_rewards: (B,) scores of the rejected completions.
        margin: how far chosen must score above rejected before the loss flattens.

    Returns:
        () mean loss over the batch.
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards - margin).mean()


# ---- preference losses -------------------------------------------------------------------------
# One function each, called with the keyword arguments it declares out of `PREFERENCE_LOSS_ARGUMENTS`:
#   chosen_logps, rejected_logps          (B,) summed log-probs of each completion under the policy
#   chosen_lengths, rejected_lengths      (B,) their token counts
#   ref_chosen_logps, ref_rejected_logps  (B,) the same under the reference (declaring them loads one)
#   beta, and the flags of the losses' records (`LOSS_FLAGS`)   the module's flags
# and returning the (B,) per-pair losses. `PREFERENCE_LOSSES` names them for `--model.loss_type`.


def log_ratio_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps) -> torch.Tensor:
    """h, the log-ratio difference every DPO-family loss is a function of (Rafailov et al. 2023, eq. 7):
    `h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))`, how much more than the reference the
    policy prefers the chosen answer; `beta h` is the margin of DPO's implicit rewards. 0 at policy == reference.

    Args:
        chosen_logps, rejected_logps: (B,) summed log-probs of each completion under the policy.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference.

    Returns:
        (B,) h of each pair.
    """
    return (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)


def dpo_sigmoid(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float, label_smoothing: float = 0.0):
    """DPO (Rafailov et al. 2023, eq. 7): `-log sigmoid(beta h)`; with `label_smoothing` e, conservative DPO
    `-(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h)`. At policy == reference every pair's loss is log 2."""
    h = log_ratio_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def rdpo(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, ref_chosen_logps, ref_rejected_logps, beta: float,
         rdpo_alpha: float = 0.01):  # fmt: skip
    """R-DPO (Park et al. 2024, "Disentangling Length from Quality in Direct Preference Optimization"): DPO on the
    reward `r(y) - alpha |y|`, i.e. `-log sigmoid(beta h + alpha (|y_w| - |y_l|))`, `alpha` `rdpo_alpha`. The part
    of a preference that the answers' lengths explain is not learnt as a log-ratio: on data whose preferred answers
    are longer, the policy learns the rest of the difference rather than "longer"."""
    h = log_ratio_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return -F.logsigmoid(beta * h + rdpo_alpha * (chosen_lengths - rejected_lengths))


def dpo_robust(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float, label_smoothing: float = 0.0):
    """Robust DPO (Chowdhury et al. 2024): `(-(1 - e) log sigmoid(beta h) + e log sigmoid(-beta h)) / (1 - 2e)`,
    unbiased under a share e of flipped labels."""
    h, e = log_ratio_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps), label_smoothing
    return (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)


def dpo_hinge(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float):
    """SLiC's hinge on the DPO log-ratio (Zhao et al. 2023): `relu(1 - beta h)`."""
    return torch.relu(1 - beta * log_ratio_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps))


def ipo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float):
    """IPO (Azar et al. 2023, eq. 17): `(h - 1 / (2 beta))^2`."""
    return (log_ratio_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps) - 1 / (2 * beta)) ** 2


def apo_zero(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float):
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", eq. 7): push the chosen
    likelihood up and the rejected one down, each against the reference:
    `1 - sigmoid(beta (log pi(y_w) - log ref(y_w))) + sigmoid(beta (log pi(y_l) - log ref(y_l)))`; 1 at policy == reference."""
    return 1 - torch.sigmoid(beta * (chosen_logps - ref_chosen_logps)) + torch.sigmoid(beta * (rejected_logps - ref_rejected_logps))


def simpo(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, beta: float, simpo_gamma: float = 0.5):
    """SimPO (Meng et al. 2024, eq. 6), no reference: `-log sigmoid(beta |y_w|^-1 log pi(y_w) - beta |y_l|^-1 log pi(y_l) - gamma)`,
    the length-normalised log-likelihoods and a target margin gamma (`simpo_gamma`)."""
    return -F.logsigmoid(beta * (chosen_logps / chosen_lengths - rejected_logps / rejected_lengths) - simpo_gamma)


def orpo(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, beta: float):
    """ORPO (Hong et al. 2024, eqs. 6-7), no reference: the chosen answer's NLL per token plus
    `-beta log sigmoid(log odds(y_w) - log odds(y_l))`, where `odds(y) = p / (1 - p)` of the per-token mean
    likelihood `p = exp(log pi(y) / |y|)` (beta is the paper's lambda)."""
    chosen, rejected = chosen_logps / chosen_lengths, rejected_logps / rejected_lengths  # (B,) mean token log-probs < 0
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    return -chosen - beta * F.logsigmoid(log_odds)


# KTO reads unpaired rows (`--data.mode unpaired`): a loss that declares `labels` is called with any of
# `UNPAIRED_LOSS_ARGUMENTS` instead:
#   logps, ref_logps        (B,) summed log-probs of each row's completion, under the policy and the reference
#   kl_logps, ref_kl_logps  (W * B,) the same of each prompt with another row's completion (`collate_unpaired`),
#                           the rows of all W processes' batches, without gradient (one process: W = 1)
#   lengths                 (B,) completion token counts
#   labels                  (B,) bool, true for a desirable completion
#   beta, and the flags of the losses' records (`LOSS_FLAGS`)   the module's flags


def kto(logps, ref_logps, kl_logps, ref_kl_logps, labels, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al. 2024, eq. 8): with `r = log pi(y|x) - log ref(y|x)` and the reference point
    `z = max(0, mean(log pi(y'|x) - log ref(y'|x)))` over mismatched pairs (x, y') of the batch (not
    differentiated), a desirable completion's loss is `lambda_D (1 - sigmoid(beta (r - z)))` and an undesirable
    one's `lambda_U (1 - sigmoid(beta (z - r)))`. At policy == reference every row's loss is lambda / 2."""
    z = (kl_logps - ref_kl_logps).mean().clamp(min=0).detach()
    r = logps - ref_logps  # (B,)
    return torch.where(labels, desirable_weight * (1 - torch.sigmoid(beta * (r - z))), undesirable_weight * (1 - torch.sigmoid(beta * (z - r))))


@dataclass(frozen=True)
class LossFlag:
    """A `DPOModule` flag that some preference losses read besides `beta`: the range it is checked against before
    any model loads (`> 0`, `>= 0`, `in [0, 0.5)`, ...) and its `--help` text."""

    range: str
    help: str


@dataclass(frozen=True)
class PreferenceLoss:
    """A preference loss and every fact about it the module, `--help` and the docs read.

    function: the loss (the contract above).
    paper: where it comes from, for `--help` and docs/losses.md.
    flags: the flags it reads besides `beta`, name -> LossFlag. Each is the `DPOModule.__init__` argument of that
        name (its type and default): passed to any loss that declares it, range-checked, changeable on resume.
    """

    function: Callable
    paper: str
    flags: dict[str, LossFlag] = field(default_factory=dict)


LABEL_SMOOTHING = {"label_smoothing": LossFlag("in [0, 0.5)", "Assumed share of flipped preference labels.")}

#: `--model.loss_type` name -> PreferenceLoss
PREFERENCE_LOSSES = {
    "sigmoid": PreferenceLoss(dpo_sigmoid, "DPO, Rafailov et al. 2023", LABEL_SMOOTHING),
    "ipo": PreferenceLoss(ipo, "IPO, Azar et al. 2023"),
    "hinge": PreferenceLoss(dpo_hinge, "SLiC hinge, Zhao et al. 2023"),
    "robust": PreferenceLoss(dpo_robust, "robust DPO, Chowdhury et al. 2024", LABEL_SMOOTHING),
    "rdpo": PreferenceLoss(rdpo, "R-DPO, Park et al. 2024 (length-regularised DPO)", {
        "rdpo_alpha": LossFlag(">= 0", "R-DPO's alpha, the reward per token of length that the loss takes out of each preference."),
    }),
    "apo_zero": PreferenceLoss(apo_zero, "APO-zero, D'Oosterlinck et al. 2024"),
    "simpo": PreferenceLoss(simpo, "SimPO, Meng et al. 2024 (no reference)", {"simpo_gamma": LossFlag(">= 0", "SimPO's target reward margin gamma.")}),
    "orpo": PreferenceLoss(orpo, "ORPO, Hong et al. 2024 (no reference)"),
    "kto": PreferenceLoss(kto, "KTO, Ethayarajh et al. 2024 (unpaired rows: --data.mode unpaired)", {
        "desirable_weight": LossFlag("> 0", "KTO's lambda_D, the weight of desirable rows (the paper balances lambda_D n_D"
                                            " / (lambda_U n_U) in [1, 4/3])."),
        "undesirable_weight": LossFlag("> 0", "KTO's lambda_U, the weight of undesirable rows."),
    }),
}  # fmt: skip

#: every flag of the table's losses, once: name -> LossFlag
LOSS_FLAGS = {name: flag for loss in PREFERENCE_LOSSES.values() for name, flag in loss.flags.items()}
PREFERENCE_LOSS_ARGUMENTS = ("chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths", "ref_chosen_logps",
                             "ref_rejected_logps", "beta", *LOSS_FLAGS)  # fmt: skip
UNPAIRED_LOSS_ARGUMENTS = ("logps", "ref_logps", "kl_logps", "ref_kl_logps", "lengths", "labels", "beta", *LOSS_FLAGS)


def rpo_nll_loss(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the chosen answers, per token: the term RPO (Pang et al. 2024,
    "Iterative Reasoning Preference Optimization") adds to the DPO loss, weighted by `rpo_alpha`.

    Args:
        chosen_logps: (B,) summed log-probs of the chosen completions under the policy.
        chosen_lengths: (B,) their token counts.

    Returns:
        () `-sum(chosen_logps) / sum(chosen_lengths)`: the mean over all chosen tokens of the batch.
    """
    return -chosen_logps.sum() / chosen_lengths.sum()


def truncated_importance_weights(logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (TIS, Yao et al. 2025) for samples drawn by another engine than the trainer.

    vLLM samples with its own kernels, so its probability of a token differs a little from the trainer's
    for the same weights. The policy gradient assumes the trainer's; each token is reweighted by the
    ratio of the two, truncated at `cap` so that a token vLLM found unlikely cannot dominate the batch.

    Args:
        logprobs: (B, T) the trainer's log-probs of the sampled tokens (the old log-probs of PPO).
        sampler_logprobs: (B, T) the sampling engine's log-probs of the same tokens.
        cap: the upper bound of a weight (>= 1).

    Returns:
        (B, T) `min(exp(logprobs - sampler_logprobs), cap)`.
    """
    return torch.exp(logprobs - sampler_logprobs).clamp(max=cap)


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss of PPO.

    Args:
        values: (B, T) current value predictions.
        old_values: (B, T) predictions at rollout time.
        returns: (B, T) GAE returns (targets).
        mask: (B, T) 1 on response tokens.
        cliprange_value: the new prediction may move at most this far from the old one.

    Returns:
        vf_loss (): `0.5 mean(max((v - R)^2, (v_clipped - R)^2))`, and vf_clipfrac ().
    """
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    losses = (values - returns) ** 2
    losses_clipped = (values_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(losses, losses_clipped), mask)
    return vf_loss, masked_mean((losses_clipped > losses).float(), mask).detach()
