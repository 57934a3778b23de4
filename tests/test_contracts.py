"""Contracts checked where they are broken: model paths and plug-ins before any work, reward workers that die or
outgrow their memory, corrupt saved parts, plug-ins that return the wrong shape (issue 33, items 5-7)."""

import math
import time

import pytest

from lit_rlhf.errors import UserError
from lit_rlhf.rewards import RewardFunctions
from test_reliability import fail
from test_rewards import function_args, prompt_rows

WORKER_PLUGIN = '''
import os, signal

KEPT = []


def exits(prompts, completions, **columns):
    os._exit(3)


def killed(prompts, completions, **columns):
    os.kill(os.getpid(), signal.SIGKILL)


def holds(prompts, completions, mib, **columns):
    """Keeps `mib[0]` MiB more in the worker at each call: a leak."""
    KEPT.append(b"x" * (mib[0] << 20))
    return [0.0] * len(prompts)


def ones(prompts, completions, **columns):
    return [1.0] * len(prompts)
'''


@pytest.fixture
def worker_plugin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "workers.py").write_text(WORKER_PLUGIN)
    return "workers.py"


# ---- item 6: a reward worker that dies or outgrows its memory -----------------------------------


@pytest.mark.parametrize("name, status", [("exits", "exit status 3"), ("killed", "killed by SIGKILL")])
def test_a_dead_reward_worker_is_reported_at_once_with_its_exit_status(worker_plugin, name, status):
    functions = RewardFunctions([f"{worker_plugin}:{name}"], timeout=60.0)
    start = time.monotonic()
    with pytest.raises(UserError, match=rf"^reward function {name} died in its worker process \({status}\) on a batch of 2 rows \(first prompt 'p'\)$"):
        functions(["p", "q"], ["a", "b"], {})
    assert time.monotonic() - start < 30  # at once, not after the 60 s timeout
    assert functions.worker is None
    lenient = RewardFunctions([f"{worker_plugin}:{name}", f"{worker_plugin}:ones"], timeout=60.0, on_error="none")
    with pytest.warns(UserWarning, match=rf"reward function {name} failed \(died in its worker process \({status}\)\); its 2 rows get None"):
        died, ones = lenient(["p", "q"], ["a", "b"], {})
    assert all(math.isnan(r) for r in died) and ones == [1.0, 1.0]  # a new worker ran the next function
    lenient.close()


def test_a_reward_worker_past_its_memory_limit_is_warned_then_stopped_with_the_number(worker_plugin):
    functions = RewardFunctions([f"{worker_plugin}:holds"], timeout=60.0, memory_limit=0.5)
    assert functions(["p"], ["a"], {"mib": [1]}) == [[0.0]] and functions.worker.resident_gib() < 0.2  # the worker alone: small
    with pytest.warns(UserWarning, match=r"the reward worker uses 0\.\d\d GiB of memory, over half of --model.reward_memory_limit 0.5 GiB"):
        functions(["p"], ["a"], {"mib": [300]})
    with pytest.raises(UserError, match=r"^reward function holds used 0\.\d\d GiB of memory in its worker process, over --model.reward_memory_limit 0.5 GiB"):
        functions(["p"], ["a"], {"mib": [300]})
    assert functions.worker is None
    with pytest.raises(UserError, match=r"^--model.reward_memory_limit 0: must be > 0$"):
        RewardFunctions([], timeout=1.0, memory_limit=0)


def test_ppo_stops_at_once_on_a_dead_reward_worker_with_one_line(tiny_model_dir, worker_plugin, tmp_path):
    start = time.monotonic()
    line = fail(["fit", *function_args(tiny_model_dir, prompt_rows(tmp_path), "--model.reward_funcs", f"[{worker_plugin}:exits]",
                                       "--model.reward_timeout", "60", "--model.reward_memory_limit", "4", "--trainer.max_steps", "1")])  # fmt: skip
    assert "reward function exits died in its worker process (exit status 3)" in line
    assert time.monotonic() - start < 60  # models loaded and one rollout sampled, but no wait for the timeout
