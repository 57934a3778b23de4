"""Built-in reward functions, with TRL's contract `f(prompts, completions, **columns) -> list[float | None]`.

Besides the prompt rows' columns, every function gets `completion_ids` (TRL's name: each response's token ids,
up to and including its EOS) and, if it declares them by name, the run's settings `overlong_max_length` and
`overlong_buffer_length` (the flags of the same names).
Examples to copy for your own (`--model.reward_funcs my_file.py:my_function`). This module imports
only the standard library: a reward worker process starts in a fraction of a second.
"""

import functools
import importlib
import inspect
import re
from typing import Optional

from lit_rlhf.plugins import resolve

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
ANSWER_LINE = re.compile(r"Answer:\s*-?\d+(?:\.\d+)?\s*$")


def final_number(prompts: list[str], completions: list[str], answer: list, **columns) -> list[Optional[float]]:
    """1.0 where the completion's last number equals the row's `answer` column, else 0.0; None where the
    row has no answer. A template to copy: exact match of a checkable result."""
    rewards = []
    for completion, expected in zip(completions, answer):
        numbers = NUMBER.findall(completion.replace(",", ""))
        rewards.append(None if expected is None else float(bool(numbers) and float(numbers[-1]) == float(expected)))
    return rewards


def answer_format(prompts: list[str], completions: list[str], **columns) -> list[float]:
    """1.0 where the completion ends with a line `Answer: <number>`, else 0.0: a format reward."""
    return [float(bool(ANSWER_LINE.search(completion.strip()))) for completion in completions]


def soft_overlong_punishment(prompts: list[str], completions: list[str], completion_ids: list[list[int]], overlong_max_length: int,
                             overlong_buffer_length: int, **columns) -> list[float]:  # fmt: skip
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), with L_max `overlong_max_length` and L_cache
    `overlong_buffer_length`: a response of |y| tokens gets 0 up to L_max - L_cache, then `(L_max - L_cache - |y|) /
    L_cache`, falling linearly to -1 at L_max, and -1 beyond. Added to a correctness reward, it tells a long answer
    from a cut one before the cut."""
    start = overlong_max_length - overlong_buffer_length  # L_max - L_cache
    return [max(-1.0, min(0.0, (start - len(ids)) / overlong_buffer_length)) for ids in completion_ids]


def repetition_penalty(prompts: list[str], completions: list[str], ngram_size: int = 3, max_penalty: float = -1.0, **columns) -> list[float]:
    """Open-R1's repetition penalty (after Yeo et al. 2025, "Demystifying long chain-of-thought reasoning"): the share
    of a completion's word `ngram_size`-grams (lower-cased, split on white space) that repeat an earlier one, times
    `max_penalty`: 0 for an answer that never repeats itself, -1 for one n-gram over and over; 0 for fewer words than
    an n-gram. Against degeneration: a reward model alone can score a looping answer well."""
    penalties = []
    for completion in completions:
        words = completion.lower().split()
        grams = [tuple(words[i : i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
        penalties.append((1 - len(set(grams)) / len(grams)) * max_penalty if grams else 0.0)
    return penalties


#: built-in reward functions for `--model.reward_funcs`
REWARD_FUNCTIONS = {"final_number": final_number, "answer_format": answer_format, "soft_overlong_punishment": soft_overlong_punishment,
                    "repetition_penalty": repetition_penalty}  # fmt: skip


@functools.cache
def reward_function(spec: str):
    """The function `spec` names (a table key or an import path), imported once per process."""
    return resolve(spec, REWARD_FUNCTIONS, "--model.reward_funcs")


def call_reward(spec: str, prompts: list[str], completions: list[str], columns: dict[str, list], settings: dict):
    """The function `spec` names, on one batch of rows, with those of the run's `settings` (name: value) it declares."""
    function = reward_function(spec)
    declared = inspect.signature(function).parameters
    return function(prompts=prompts, completions=completions, **columns, **{k: v for k, v in settings.items() if k in declared})


@functools.cache
def handler(path: str):
    """The function a worker request names by its `module:function` path (`call_reward`; the environments' and tools'
    calls of lit_rlhf/tools.py), imported once per process."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def serve(connection) -> None:
    """A worker's loop (reward functions, environments, tools): says `ready`, then answers each `(handler, arguments)`
    received with `("ok", handler(*arguments))` or `("raised", "TypeName: message")`, until the pipe closes."""
    connection.send(("ready", None))
    while True:
        try:
            path, arguments = connection.recv()
        except EOFError:
            return
        try:
            connection.send(("ok", handler(path)(*arguments)))
        except Exception as err:  # the function's error, or a return value that cannot be pickled
            connection.send(("raised", f"{type(err).__name__}: {err}"))
