"""Evaluation statistics: intervals, win-rates, degeneration. Pure functions on tensors and strings."""

import math
import re
from collections import Counter

import torch


def bootstrap_ci(values: torch.Tensor, num_resamples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean of `values` (N,) and its percentile bootstrap interval (Efron 1979).

    Returns (mean, low, high): the `(1 - level) / 2` and `(1 + level) / 2` quantiles of the means of
    `num_resamples` resamples of N values drawn with replacement. A constant gives (c, c, c).
    """
    values = values.double().flatten()
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(values), (num_resamples, len(values)), generator=generator)
    means = values[idx].mean(1)  # (num_resamples,)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return values.mean().item(), min(low, values.mean().item()), max(high, values.mean().item())


def wins(scores: torch.Tensor, baseline_scores: torch.Tensor) -> torch.Tensor:
    """Per prompt: 1 where `scores` beats `baseline_scores`, 0.5 on a tie, 0 otherwise. (N,), (N,) -> (N,)"""
    return (scores > baseline_scores).double() + 0.5 * (scores == baseline_scores).double()


def length_controlled_win_rate(win: torch.Tensor, length_diff: torch.Tensor, ridge: float = 1e-4, steps: int = 50) -> float:
    """Win-rate at equal length: `sigmoid(a)` of the logistic regression `P(win) = sigmoid(a + b * z)`,
    z = length difference (model - baseline, tokens) divided by its standard deviation.

    Args:
        win: (N,) outcomes in [0, 1] (ties 0.5, used as soft labels).
        length_diff: (N,) response length of the model minus the baseline's, per prompt.
        ridge: L2 penalty on `b` only, which keeps the fit finite when length separates the outcomes.

    A model that wins only by being longer gets a length-controlled win-rate near 0.5 (as in
    AlpacaEval's length-controlled win-rate, Dubois et al. 2024). Fitted by Newton's method.
    """
    y = win.double()
    std = length_diff.double().std()
    z = length_diff.double() / std if std > 0 else torch.zeros_like(y)
    X = torch.stack([torch.ones_like(z), z], 1)  # (N, 2)
    penalty = torch.diag(torch.tensor([0.0, ridge], dtype=torch.float64)) * len(y)
    theta = torch.zeros(2, dtype=torch.float64)
    for _ in range(steps):
        p = torch.sigmoid(X @ theta)
        grad = X.T @ (p - y) + penalty @ theta
        hessian = X.T @ (X * (p * (1 - p))[:, None]) + penalty + 1e-12 * torch.eye(2, dtype=torch.float64)
        theta = theta - torch.linalg.solve(hessian, grad)
    return torch.sigmoid(theta[0]).item()


def words(text: str) -> list[str]:
    return re.findall(r"\w+(?:'\w+)?", text.lower())


def has_loop(text: str, n: int = 4, min_count: int = 3) -> bool:
    """True if some word n-gram occurs at least `min_count` times: "sausage, sausage, sausage, ..." loops."""
    tokens = words(text)
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    return any(count >= min_count for count in grams.values())


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams over all n-grams of all `texts`; 0 when there are none."""
    grams = [tuple(tokens[i : i + n]) for tokens in map(words, texts) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def interval_text(stat: tuple[float, float, float], digits: int = 3) -> str:
    """`mean [low, high]` for reports."""
    mean, low, high = stat
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]" if math.isfinite(mean) else "n/a"
