"""The rewards of an RL step: a reward model and reward functions, as one list (TRL's `reward_funcs`).

`Rewards` holds the run's reward sources in order, the reward model first, then the reward functions,
and one weight each (`--model.reward_weights`). Each source scores every response into one column of
an (N, F) matrix; a response's reward is the weighted sum of its row (`weighted_total`).

A reward function is called as

    f(prompts: list[str], completions: list[str], **columns) -> list[float | None]

with one entry per sampled response: `prompts` the user's last message, `completions` the decoded
response, `completion_ids` its token ids (up to and including its EOS), and each extra column of the
prompt rows (e.g. `answer`) repeated for each of a prompt's responses; a function that declares one of
the run's settings (`overlong_max_length`, `overlong_buffer_length`: `reward_settings`) by
name gets its value. `None` means that the function does not apply to that row: the source is left out of the
row's weighted total, never counted as 0.

The functions run in one worker process, `timeout` seconds per call. One that hangs is stopped; one
that raises, returns the wrong length or a non-number stops the run with a line naming the function,
the row and what happened; a worker that dies (`os._exit`, a signal, a crash of native code) is
reported at once with its exit status or signal. With a memory limit, the worker's resident memory
(its interpreter included; read from Linux's /proc) is checked every `POLL_SECONDS` during a call and
after it: past half the limit a warning gives the number, past the limit the worker is stopped and
the call fails with the number. With `on_error="none"` a failed call gives its rows None instead,
counted in a warning; the next call starts a new worker.
"""

import math
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cached_property
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable, Literal, NoReturn, Optional

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_rlhf.errors import UserError, check_ranges
from lit_rlhf.ops import flat_groups
from lit_rlhf.plugins import resolve
from lit_rlhf.reward_functions import REWARD_FUNCTIONS

#: seconds between two checks of a running call's worker (alive, resident memory)
POLL_SECONDS = 0.2


def source_name(spec: str) -> str:
    """A reward function's name in logs and errors: the table key, or the function name of an import path."""
    return spec.rpartition(":")[2]


class CallFailed(Exception):
    """A reward call that returned nothing; the message says why, as the error line shows it."""


class FunctionRaised(CallFailed):
    """The function raised in the worker, which lives on: the row it fails on can be looked for."""


class Worker:
    """A fresh interpreter running `reward_functions.serve` on one end of a pipe. It imports the standard library
    and the functions it is asked to call only (no fork of a process with threads, no re-import of the main script),
    so it starts in a fraction of a second and the memory it holds is the functions'."""

    def __init__(self):
        self.connection, child = multiprocessing.Pipe()
        code = "import sys; from multiprocessing.connection import Connection; from lit_rlhf.reward_functions import serve; serve(Connection(int(sys.argv[1])))"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))  # the modules this process can import
        self.process = subprocess.Popen([sys.executable, "-c", code, str(child.fileno())], pass_fds=[child.fileno()], env=env)
        child.close()
        self.warned = False  # about its memory

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.connection.close()

    def death(self) -> str:
        """How the ended worker ended: `died in its worker process (exit status 3)`, or `(killed by SIGKILL)`."""
        code = self.process.wait()
        status = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        return f"died in its worker process ({status})"

    def resident_gib(self) -> float:
        """Its resident memory in GiB (VmRSS of /proc/PID/status; 0 once it has ended)."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except FileNotFoundError:
            return 0.0
        kib = next((line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")), "0")
        return int(kib) / 2**20


def reward_settings(max_length: int, buffer_length: Optional[int]) -> dict[str, int]:
    """The run's settings a reward function may declare by name: L_max and L_cache of the soft overlong punishment
    (`buffer_length` null: L_max // 5, at least 1), checked."""
    buffer_length = buffer_length or max(1, max_length // 5)
    if buffer_length > max_length:
        raise UserError(f"--model.overlong_buffer_length {buffer_length} is longer than the max length {max_length} it ends at"
                        " (--model.overlong_max_length, default --model.response_length)")  # fmt: skip
    return {"overlong_max_length": max_length, "overlong_buffer_length": buffer_length}


class SupervisedWorker:
    """Calls into one `Worker`, started on first use, each call watched: the worker is stopped if the call takes longer
    than `timeout` seconds or its memory passes `memory_limit` GiB, and reported at once if it dies; the call then fails
    (`CallFailed`) saying which, and the next call starts a new worker. `name` (`reward`, `environment`) names the
    worker and its flags (`--model.<name>_timeout`, `--model.<name>_memory_limit`) in the messages."""

    def __init__(self, name: str, timeout: float, memory_limit: Optional[float] = None):
        check_ranges("model", {f"{name}_memory_limit": memory_limit}, {f"{name}_memory_limit": "> 0"})
        if memory_limit is not None and not Path("/proc/self/status").is_file():
            raise UserError(f"--model.{name}_memory_limit {memory_limit:g}: reads a process's memory from /proc, which only Linux has")
        self.name, self.timeout, self.memory_limit = name, timeout, memory_limit
        self.worker: Optional[Worker] = None

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    def stop(self, what: str) -> NoReturn:
        """Stop the worker and fail the call with `what` happened."""
        self.close()
        raise CallFailed(what)

    def request(self, handler: str, *arguments):
        """`handler(*arguments)` in the worker (`handler` a `module:function` path, `reward_functions.serve`): its return
        value, or a CallFailed saying why there is none."""
        if self.worker is None:
            self.worker = Worker()
            self.receive(math.inf)  # its `ready`: the start-up is not timed
        self.worker.connection.send((handler, arguments))
        status, value = self.receive(self.timeout)
        if status == "raised":
            raise FunctionRaised(f"raised {value}")
        return value

    def receive(self, timeout: float) -> tuple[str, object]:
        """The worker's next message, the worker watched until it comes: stopped if it takes longer than `timeout`
        or its memory passes the limit, reported at once if it dies."""
        worker, deadline = self.worker, time.monotonic() + timeout
        while not wait([worker.connection], min(POLL_SECONDS, max(0.0, deadline - time.monotonic()))):
            if worker.process.poll() is not None:  # its end of the pipe may live on in a process it started
                self.stop(worker.death())
            self.check_memory()
            if time.monotonic() >= deadline:
                self.stop(f"did not return within --model.{self.name}_timeout {self.timeout:g} s")
        try:
            message = worker.connection.recv()
        except (EOFError, OSError):
            self.stop(worker.death())
        self.check_memory()
        return message

    def check_memory(self) -> None:
        """Stop a worker whose resident memory is past the limit; warn once when it passes half of it."""
        if self.memory_limit is None:
            return
        used = self.worker.resident_gib()
        if used > self.memory_limit:
            self.stop(f"used {used:.2f} GiB of memory in its worker process, over --model.{self.name}_memory_limit {self.memory_limit:g} GiB")
        if used > self.memory_limit / 2 and not self.worker.warned:
            self.worker.warned = True
            rank_zero_warn(f"the {self.name} worker uses {used:.2f} GiB of memory, over half of --model.{self.name}_memory_limit"
                           f" {self.memory_limit:g} GiB; it is stopped past the limit")  # fmt: skip


class RewardFunctions(SupervisedWorker):
    """The reward functions of a run, each called in one worker process with a timeout (and a memory limit)."""

    def __init__(self, specs: list[str], timeout: float, on_error: Literal["stop", "none"] = "stop", memory_limit: Optional[float] = None,
                 settings: Optional[dict] = None):  # fmt: skip
        """`memory_limit`: GiB of resident memory the worker may use (`--model.reward_memory_limit`); None: no limit.
        `settings`: the run's settings (name: value), given to the functions that declare them by name."""
        super().__init__("reward", timeout, memory_limit)
        for spec in specs:  # import each once here, so that a wrong name or path fails at start, naming it
            resolve(spec, REWARD_FUNCTIONS, "--model.reward_funcs")
        self.specs, self.names = list(specs), [source_name(spec) for spec in specs]
        self.on_error, self.settings = on_error, settings or {}
        self.failures = 0  # calls whose rows got None (on_error="none")

    def run(self, spec: str, prompts: list[str], completions: list[str], columns: dict[str, list]):
        """One call of `spec` in the worker: its return value, or a CallFailed saying why there is none."""
        return self.request("lit_rlhf.reward_functions:call_reward", spec, prompts, completions, columns, self.settings)

    def __call__(self, prompts: list[str], completions: list[str], columns: dict[str, list]) -> list[list[float]]:
        """Each function's rewards of the rows, `nan` where it returned None: one list of len(rows) per function."""
        return [self.call(spec, prompts, completions, columns) for spec in self.specs]

    def call(self, spec: str, prompts: list[str], completions: list[str], columns: dict[str, list]) -> list[float]:
        """The function `spec`'s rewards of the rows, `nan` where it returned None (or failed, with `on_error="none"`)."""
        name = source_name(spec)
        try:
            rewards = self.run(spec, prompts, completions, columns)
        except CallFailed as err:
            if self.on_error != "none":
                raise UserError(f"reward function {name} {self.failing_row(spec, prompts, completions, columns, err)}") from None
            self.failures += 1
            rank_zero_warn(f"reward function {name} failed ({err}); its {len(prompts)} rows get None ({self.failures} calls so far)")
            rewards = [None] * len(prompts)
        return checked(rewards, name, len(prompts))

    def sources(self) -> list["RewardFunction"]:
        """One reward source per function, each called in this worker."""
        return [RewardFunction(source_name(spec), spec, self) for spec in self.specs]

    def failing_row(self, spec: str, prompts: list[str], completions: list[str], columns: dict[str, list], err: CallFailed) -> str:
        """What went wrong, and on which row: after a raise, each row is called alone until one fails."""
        if isinstance(err, FunctionRaised):
            for i in range(len(prompts)):
                try:
                    self.run(spec, prompts[i : i + 1], completions[i : i + 1], {k: v[i : i + 1] for k, v in columns.items()})
                except CallFailed as row_err:
                    return f"{row_err} on row {i} (prompt {prompts[i][:60]!r})"
        return f"{err} on a batch of {len(prompts)} rows (first prompt {prompts[0][:60]!r})"


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


@dataclass
class Responses:
    """N sampled responses, as the reward sources read them."""

    batch: dict[str, torch.Tensor]  # input_ids, attention_mask (N, P + R): each prompt (left-padded) followed by its response
    context_length: int  # P: where the responses start
    prompts: list[str]  # (N,) the user's prompt each response answers
    columns: dict[str, list]  # the prompt rows' other fields (e.g. `answer`), one entry per response
    decode: Callable[[torch.Tensor], str]  # token ids -> text
    environment_rewards: Optional[torch.Tensor] = None  # (N,) the environment's reward of each rollout, nan: none (multi-turn)

    @classmethod
    def of(cls, prompts: dict, answered: dict[str, torch.Tensor], k: int, decode: Callable[[torch.Tensor], str],
           environment_rewards: Optional[torch.Tensor] = None) -> "Responses":  # fmt: skip
        """The k responses to each prompt of the DataModule's batch `prompts` (its `prompt_text` and `columns`, each
        repeated k times), `answered` holding the prompts followed by the responses (N = B * k rows, groups contiguous);
        with an environment, its `environment_rewards` (N,)."""
        texts = prompts.get("prompt_text", [""] * len(prompts["input_ids"]))
        columns = {name: [v for v in values for _ in range(k)] for name, values in prompts.get("columns", {}).items()}
        return cls(answered, prompts["input_ids"].shape[1], [text for text in texts for _ in range(k)], columns, decode, environment_rewards)

    @cached_property
    def response_ids(self) -> list[torch.Tensor]:
        """(N,) each response's token ids (R_i,), up to and including its EOS."""
        P = self.context_length
        return [ids[mask.bool()] for ids, mask in zip(self.batch["input_ids"][:, P:], self.batch["attention_mask"][:, P:])]

    @cached_property
    def completion_ids(self) -> list[list[int]]:
        """(N,) `response_ids` as lists: what reward functions read as `completion_ids`."""
        return [ids.tolist() for ids in self.response_ids]

    @cached_property
    def completions(self) -> list[str]:
        """(N,) the responses as text, special tokens skipped: what reward functions read."""
        return [self.decode(ids) for ids in self.response_ids]


@dataclass
class RewardModel:
    """The reward model as a reward source: `score(batch, context_length)` (B,) of each prompt + response."""

    score: Callable[[dict[str, torch.Tensor], int], torch.Tensor]
    name: str = "reward_model"
    may_abstain: bool = False  # a nan is an error, never "does not apply"

    def __call__(self, responses: Responses) -> torch.Tensor:
        """(N,) the reward model's score of each response."""
        return self.score(responses.batch, responses.context_length)


@dataclass
class RewardFunction:
    """A reward function as a reward source, called in the run's reward worker (`RewardFunctions`)."""

    name: str
    spec: str  # a REWARD_FUNCTIONS name or an import path
    worker: RewardFunctions
    may_abstain: bool = True  # None: does not apply to the row

    def __call__(self, responses: Responses) -> torch.Tensor:
        """(N,) the function's reward of each response, nan where it returned None."""
        columns = responses.columns | {"completion_ids": responses.completion_ids}
        rewards = self.worker.call(self.spec, responses.prompts, responses.completions, columns)
        return torch.tensor(rewards, device=responses.batch["input_ids"].device)


@dataclass
class EnvironmentReward:
    """The environment of a multi-turn rollout (`--model.environment`) as a reward source: the `reward` it set, if any."""

    name: str = "environment"
    may_abstain: bool = True  # None: the environment set no reward for the rollout

    def __call__(self, responses: Responses) -> torch.Tensor:
        """(N,) the environment's reward of each rollout, nan where it set none."""
        return responses.environment_rewards


def reward_sources(hp, reward_model_scores: Callable[[dict[str, torch.Tensor], int], torch.Tensor]) -> tuple[RewardFunctions, "Rewards"]:
    """The reward functions of the `--model.*` flags `hp` (in their worker) and every reward source of the run, with
    their weights: the reward model (`reward_model_scores`, with `reward_model_path`), the functions, the environment."""
    settings = reward_settings(hp.overlong_max_length or hp.response_length, hp.overlong_buffer_length)
    functions = RewardFunctions(hp.reward_funcs or [], hp.reward_timeout, hp.reward_errors, hp.reward_memory_limit, settings)
    model_source = [RewardModel(reward_model_scores)] if hp.reward_model_path else []
    return functions, Rewards(model_source + functions.sources() + ([EnvironmentReward()] if hp.environment else []), hp.reward_weights)


class Rewards:
    """The run's reward sources as one list, each with one weight, as TRL's `reward_funcs` and `reward_weights`."""

    def __init__(self, sources: list, weights: Optional[list[float]] = None):
        """`sources`: callables `(Responses) -> (N,)` with a `name` and `may_abstain` (`RewardModel`, `RewardFunction`);
        `weights`: one per source (default: 1 each)."""
        self.sources, self.names = sources, [source.name for source in sources]
        if weights is not None and len(weights) != len(sources):
            raise UserError(f"--model.reward_weights has {len(weights)} values for {len(sources)} reward sources"
                            f" ({', '.join(self.names)}): give one weight per source")  # fmt: skip
        self.weights = [1.0] * len(sources) if weights is None else list(weights)

    def __call__(self, responses: Responses) -> torch.Tensor:
        """(N, F) each source's score of each response (float), nan where a function returned None."""
        return torch.stack([source(responses) for source in self.sources], 1).float()

    def total(self, scores: torch.Tensor) -> torch.Tensor:
        """(N,) each response's weighted total of its `scores` (N, F) over the sources that apply (`weighted_total`)."""
        may_abstain = torch.tensor([source.may_abstain for source in self.sources], device=scores.device)
        return weighted_total(scores, torch.tensor(self.weights, device=scores.device), may_abstain)


def weighted_total(scores: torch.Tensor, weights: torch.Tensor, may_abstain: torch.Tensor) -> torch.Tensor:
    """Each row's reward: the weighted sum of its sources, leaving out a function's None (nan) rather than counting it 0.

    Args:
        scores: (N, F) each source's score of each row, nan where a function returned None.
        weights: (F,) one weight per source.
        may_abstain: (F,) bool, the sources whose nan means "does not apply" (reward functions). Another source's
            nan (a reward model's) stays nan: it is an error.

    Returns:
        (N,) `sum_f w_f r_f` over the sources that apply to the row (0 where none does).
    """
    weighted = weights * scores  # (N, F)
    return weighted.masked_fill(may_abstain & scores.isnan(), 0.0).sum(1)


def reward_stats(scores: torch.Tensor, names: list[str], total: torch.Tensor, k: int) -> dict:
    """TensorBoard scalars of one rollout's rewards, from each source's `scores` (N, F) and the weighted `total` (N,):
    each source's mean over the rows it applies to (`rewards/<name>/mean`) and its share of None
    (`rewards/<name>/none_share`), the weighted total (`rewards/total`), the share of rows no source applies
    to (`rewards/unscored_share`) and, with k > 1, the share of groups whose k totals are all equal
    (`rewards/flat_group_share`: no learning signal for the group estimators)."""
    none = scores.isnan()  # (N, F)
    stats = {"rewards/total": total.mean(), "rewards/unscored_share": none.all(1).float().mean()}
    for name, column, missing in zip(names, scores.T, none.T):
        stats |= {f"rewards/{name}/none_share": missing.float().mean()}
        if not missing.all():
            stats |= {f"rewards/{name}/mean": column[~missing].mean()}
    if k > 1:
        stats["rewards/flat_group_share"] = flat_groups(total, k).float().mean()
    return stats
