"""Rewards written in Python (RL from verifiable rewards), with TRL's contract.

A reward function is called as

    f(prompts: list[str], completions: list[str], **columns) -> list[float | None]

with one entry per sampled response: `prompts` the user's last message, `completions` the decoded
response, and each extra column of the prompt rows (e.g. `answer`) repeated for each of a prompt's
responses. `None` means that the function does not apply to that row: the source is left out of the
row's weighted total, never counted as 0.

The functions run in a worker process, `timeout` seconds per call. One that hangs is stopped; one
that raises, returns the wrong length or a non-number stops the run with a line naming the function,
the row and what happened; with `on_error="none"` a hang or an exception gives that call's rows None
instead, counted in a warning.
"""

import math
import multiprocessing
from multiprocessing.pool import Pool
from typing import Literal, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_rlhf.errors import UserError
from lit_rlhf.plugins import resolve
from lit_rlhf.reward_functions import REWARD_FUNCTIONS, call_reward

def source_name(spec: str) -> str:
    """A reward function's name in logs and errors: the table key, or the function name of an import path."""
    return spec.rpartition(":")[2]


class RewardFunctions:
    """The reward functions of a run, each called in one worker process with a timeout."""

    def __init__(self, specs: list[str], timeout: float, on_error: Literal["stop", "none"] = "stop"):
        for spec in specs:  # import each once here, so that a wrong name or path fails at start, naming it
            resolve(spec, REWARD_FUNCTIONS, "--model.reward_funcs")
        self.specs, self.names = list(specs), [source_name(spec) for spec in specs]
        self.timeout, self.on_error = timeout, on_error
        self.pool: Optional[Pool] = None
        self.failures = 0  # calls whose rows got None (on_error="none")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None

    def run(self, spec: str, prompts: list[str], completions: list[str], columns: dict[str, list]):
        """One call of `spec` in the worker; a hang terminates the worker (a new one starts on the next call)."""
        if self.pool is None:  # a fresh interpreter (no fork of a process with threads); its start-up is not timed
            self.pool = multiprocessing.get_context("spawn").Pool(1)
            self.pool.apply(len, ([],))
        result = self.pool.apply_async(call_reward, (spec, prompts, completions, columns))
        try:
            return result.get(self.timeout)
        except multiprocessing.TimeoutError:
            self.close()
            raise TimeoutError(f"did not return within --model.reward_timeout {self.timeout:g} s") from None

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> list[list[float]]:
        """Each function's rewards of the rows, `nan` where it returned None: one list of len(rows) per function."""
        out = []
        for spec, name in zip(self.specs, self.names):
            try:
                rewards = self.run(spec, prompts, completions, columns)
            except Exception as err:
                if self.on_error == "none":
                    self.failures += 1
                    rank_zero_warn(f"reward function {name} failed ({type(err).__name__}: {err}); its {len(prompts)} rows get None ({self.failures} calls so far)")
                    rewards = [None] * len(prompts)
                else:
                    raise UserError(f"reward function {name} {self.failing_row(spec, prompts, completions, columns, err)}") from None
            out.append(checked(rewards, name, len(prompts)))
        return out

    def failing_row(self, spec: str, prompts: list[str], completions: list[str], columns: dict[str, list], err: Exception) -> str:
        """What went wrong, and on which row: each row is called alone until one fails."""
        if not isinstance(err, TimeoutError):
            for i in range(len(prompts)):
                try:
                    self.run(spec, prompts[i : i + 1], completions[i : i + 1], {k: v[i : i + 1] for k, v in columns.items()})
                except Exception as row_err:
                    return f"raised {type(row_err).__name__}: {row_err} on row {i} (prompt {prompts[i][:60]!r})"
        what = str(err) if isinstance(err, TimeoutError) else f"raised {type(err).__name__}: {err}"
        return f"{what} on a batch of {len(prompts)} rows (first prompt {prompts[0][:60]!r})"


def checked(rewards, name: str, num_rows: int) -> list[float]:
    """`rewards` as floats (None -> nan), or a UserError if it is not one number or None per row."""
    if not isinstance(rewards, (list, tuple)) or len(rewards) != num_rows:
        got = f"{len(rewards)} values" if isinstance(rewards, (list, tuple)) else type(rewards).__name__
        raise UserError(f"reward function {name} returned {got} for {num_rows} rows: it must return one float or None per row")
    out = []
    for i, reward in enumerate(rewards):
        if reward is None:
            out.append(math.nan)
        elif isinstance(reward, (int, float)) and not isinstance(reward, bool) and math.isfinite(reward):
            out.append(float(reward))
        else:
            raise UserError(f"reward function {name} returned {reward!r} for row {i}: it must return a finite float or None")
    return out


def weighted_total(source_scores: torch.Tensor, weights: torch.Tensor, functions_from: int) -> torch.Tensor:
    """Each row's reward: the weighted sum of its sources, leaving out a function's None (nan) rather than counting it 0.

    Args:
        source_scores: (S, N) each source's score of each row; rows `functions_from`.. are reward functions,
            nan where one returned None. A reward model's nan (before them) stays nan: it is an error.
        weights: (S,) one weight per source.
        functions_from: the first row of `source_scores` that is a reward function.

    Returns:
        (N,) `sum_s w_s r_s` over the sources that apply to the row (0 where none does).
    """
    weighted = weights[:, None] * source_scores  # (S, N)
    return weighted[:functions_from].sum(0) + weighted[functions_from:].nansum(0)


def reward_stats(source_scores: torch.Tensor, names: list[str], total: torch.Tensor, k: int) -> dict:
    """TensorBoard scalars of one rollout's rewards: each source's mean over the rows it applies to
    (`rewards/<name>/mean`) and its share of None (`rewards/<name>/none_share`), the weighted total
    (`rewards/total`), the share of rows no source applies to (`rewards/unscored_share`) and, with k > 1,
    the share of groups whose k totals are all equal (`rewards/flat_group_share`: no learning signal
    for the group estimators)."""
    none = source_scores.isnan()  # (S, N)
    stats = {"rewards/total": total.mean(), "rewards/unscored_share": none.all(0).float().mean()}
    for name, scores, missing in zip(names, source_scores, none):
        stats |= {f"rewards/{name}/none_share": missing.float().mean()}
        if not missing.all():
            stats |= {f"rewards/{name}/mean": scores[~missing].mean()}
    if k > 1:
        groups = total.view(-1, k)  # (B, k)
        stats["rewards/flat_group_share"] = (groups.max(1).values == groups.min(1).values).float().mean()
    return stats
