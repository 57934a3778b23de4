"""Contracts checked where they are broken: model paths and plug-ins before any work, reward workers that die or
outgrow their memory, corrupt saved parts, plug-ins that return the wrong shape (issue 33, items 5-7)."""

import json
import math
import time

import pytest
import torch

from lit_rlhf.errors import UserError
from lit_rlhf.estimators import checked_estimate
from lit_rlhf.evaluate import resumable
from lit_rlhf.plugins import import_function
from lit_rlhf.rewards import RewardFunctions
from test_dpo import dpo_args
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


# ---- item 5: every model path and plug-in checked before any work ------------------------------


def bad_sources(tmp_path) -> list[tuple[str, str]]:
    """Mistyped model sources, each with the start of the line that names it (after the flag)."""
    (tmp_path / "empty").mkdir()
    return [
        (str(tmp_path / "nowhere"), f": {tmp_path / 'nowhere'} is not a Hugging Face model folder (no config.json); pass a folder"),
        ("empty", ": empty is not a Hugging Face model folder (no config.json); pass a folder"),
        ("logs/grpo/version_0/hf", f" logs/grpo/version_0/hf: no such folder in {tmp_path}, and not a hub id (owner/name); pass a folder"),
        ("nobody/no-model", f" nobody/no-model: no such folder in {tmp_path}, nor a model in the local hub cache (the hub is unreachable); pass"),
        (str(tmp_path / "run.ckpt"), f" {tmp_path / 'run.ckpt'}: no such checkpoint file"),
    ]


@pytest.fixture
def no_work(monkeypatch):
    """Records every model load and generation of `evaluate` and `task-accuracy`: none may happen before the checks."""
    from lit_rlhf import evaluate, tasks

    done = []
    for module, name in ((evaluate, "load_causal_lm"), (evaluate, "load_scalar_model"), (evaluate, "generate_answers"), (tasks, "load_causal_lm")):
        monkeypatch.setattr(module, name, lambda *args, _name=name, **kwargs: done.append(_name))
    return done


def test_task_accuracy_checks_every_model_and_judge_before_the_first_model(tiny_model_dir, tmp_path, monkeypatch, no_work):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "task.jsonl").write_text(json.dumps({"prompt": "What is 1 + 1?", "answer": 2}) + "\n")
    common = ["task-accuracy", "--dataset", "task.jsonl", "--k", "1", "--max_new_tokens", "2"]
    for source, message in bad_sources(tmp_path):
        line = fail([*common, "--models", json.dumps({"base": tiny_model_dir, "typo": source})])
        assert line.startswith(f"lit-rlhf: error: --models typo{message}"), line
    line = fail([*common, "--models", json.dumps({"base": tiny_model_dir}), "--reward_funcs", "[judge.py:exact]"])
    assert line == f"lit-rlhf: error: --reward_funcs judge.py:exact: no such file {tmp_path / 'judge.py'}"
    assert no_work == []


def test_evaluate_checks_every_model_and_plugin_before_the_first_model(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path, monkeypatch, no_work):
    monkeypatch.chdir(tmp_path)
    common = ["evaluate", "--reward_model", tiny_reward_dir, "--data.dataset", str(real_rows), "--data.max_length", "64",
              "--data.max_prompt_length", "32", "--unseen_dataset", str(real_rows.parent / "dolly_sample.jsonl")]  # fmt: skip
    models = ["--models", json.dumps({"base": tiny_model_dir})]
    for source, message in bad_sources(tmp_path):
        line = fail([*common, "--models", json.dumps({"base": tiny_model_dir, "typo": source})])
        assert line.startswith(f"lit-rlhf: error: --models typo{message}"), line
        assert fail([*common, *models, "--judge_model", source]).startswith(f"lit-rlhf: error: --judge_model{message}")
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"prompt": "What is 1 + 1?", "answer": 2}) + "\n")
    line = fail([*common, *models, "--task_dataset", str(task), "--task_reward_funcs", "[judge.py:exact]"])
    assert line == f"lit-rlhf: error: --task_reward_funcs judge.py:exact: no such file {tmp_path / 'judge.py'}"
    assert no_work == []


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


# ---- item 7: named files and contracts in errors -----------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "not a result"])
def test_a_corrupt_saved_part_is_named_with_what_to_do(tmp_path, damage):
    part = tmp_path / "parts" / "model_dpo.json"
    assert resumable(part, {"model": "dpo"}, lambda: {"reward": 1.5, "text": "a long answer"}, resume=True) == {"reward": 1.5, "text": "a long answer"}
    text = part.read_text()
    part.write_text(text[: len(text) // 2] if damage == "truncated" else "[]")  # a copy cut short; another file under its name
    computed = []
    with pytest.raises(UserError, match=rf"^--resume: {part} is truncated or corrupt \(.+\); delete it to recompute it$"):
        resumable(part, {"model": "dpo"}, lambda: computed.append(1), resume=True)
    assert computed == []
    assert resumable(part, {"model": "dpo"}, lambda: {"reward": 2.0}, resume=False) == {"reward": 2.0}  # without --resume: recomputed


LOSS_PLUGIN = """
def scalar(chosen_logps, rejected_logps, beta):
    return -(beta * (chosen_logps - rejected_logps)).sigmoid().log().mean()


def one_short(chosen_logps, rejected_logps, beta):
    return -(beta * (chosen_logps - rejected_logps)).sigmoid().log()[:-1]
"""


@pytest.mark.parametrize("name, shape", [("scalar", "()"), ("one_short", "(3,)")])
def test_a_plugin_loss_of_the_wrong_shape_is_named_with_its_contract(tiny_model_dir, real_rows, tmp_path, monkeypatch, name, shape):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_losses.py").write_text(LOSS_PLUGIN)
    line = fail(dpo_args(tiny_model_dir, real_rows, "--model.loss_type", f"my_losses.py:{name}", "--trainer.limit_val_batches", "0"))
    assert f"--model.loss_type my_losses.py:{name} returned a Tensor of shape {shape} where it must return the (B,) per-pair losses, here of shape (4,)" in line


ESTIMATOR_PLUGIN = """
import torch


def advantages_only(rewards, mask):
    return rewards * mask


def per_response(rewards, mask):
    return (rewards * mask).sum(1), None


def short_returns(rewards, mask):
    return rewards * mask, (rewards * mask)[:, :-1]


def fine(rewards, mask):
    return rewards * mask, None
"""


@pytest.mark.parametrize("name, message", [
    ("advantages_only", "returned a Tensor where it must return (advantages, returns or None), each of shape (N, T), here (6, 4)"),
    ("per_response", "returned a Tensor of shape (6,) where it must return the (N, T) advantages first, here of shape (6, 4)"),
    ("short_returns", "returned a Tensor of shape (6, 3) where it must return the (N, T) returns (or None) second, here of shape (6, 4)"),
])  # fmt: skip
def test_a_plugin_estimator_of_the_wrong_shape_is_named_with_its_contract(tmp_path, name, message):
    (tmp_path / "my_estimators.py").write_text(ESTIMATOR_PLUGIN)
    spec = f"{tmp_path / 'my_estimators.py'}:{name}"
    rewards, mask = torch.randn(6, 4), torch.ones(6, 4)
    with pytest.raises(UserError, match=f"^--model.advantage_estimator {spec} {message}".replace("(", r"\(").replace(")", r"\)")):
        checked_estimate(import_function(spec, "--model.advantage_estimator")(rewards=rewards, mask=mask), spec, rewards.shape)
    fine = f"{tmp_path / 'my_estimators.py'}:fine"
    advantages, returns = checked_estimate(import_function(fine, "--model.advantage_estimator")(rewards=rewards, mask=mask), fine, rewards.shape)
    assert torch.equal(advantages, rewards) and returns is None


HYPERPARAMETER_PLUGIN = """
import torch


def scaled_rewards(rewards, mask, scale: float = 1.0):
    '''REINFORCE without a baseline, each token's reward times `scale`.'''
    return rewards * mask * scale, None


def weighted_reinforce(logprobs, advantages, weight: float = 1.0):
    return -weight * advantages * logprobs, {}


def gapped_margin(chosen_logps, rejected_logps, beta, gap: float = 0.0):
    return -torch.nn.functional.logsigmoid(beta * (chosen_logps - rejected_logps) - gap)
"""


def test_a_plugins_hyperparameters_are_set_by_its_args_flag_and_checked(tmp_path, tiny_model_dir):
    """An entry with a new hyperparameter is its function alone: a keyword argument with a default outside the contract,
    set by the table's `_args` flag; a name that is no hyperparameter is refused with the ones there are."""
    from lit_rlhf.dpo import DPOModule
    from lit_rlhf.estimators import resolved_estimator
    from lit_rlhf.policy_losses import resolved_policy_loss

    (tmp_path / "mine.py").write_text(HYPERPARAMETER_PLUGIN)
    rewards, mask = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    estimator, arguments = resolved_estimator(f"{tmp_path / 'mine.py'}:scaled_rewards", {"scale": 3.0})
    assert arguments == ("rewards", "mask")  # `scale` is not asked of the update
    assert torch.equal(estimator.function(rewards=rewards, mask=mask)[0], torch.tensor([[3.0, 6.0], [9.0, 0.0]]))
    default, _ = resolved_estimator(f"{tmp_path / 'mine.py'}:scaled_rewards")
    assert torch.equal(default.function(rewards=rewards, mask=mask)[0], torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
    loss = resolved_policy_loss(f"{tmp_path / 'mine.py'}:weighted_reinforce", {"weight": 0.5})
    losses, _ = loss(logprobs=torch.tensor([[-2.0, -4.0]]), advantages=torch.tensor([[1.0, -1.0]]), old_logprobs=None, mask=None,
                     cliprange_low=0.2, cliprange_high=0.2, weights=None)  # fmt: skip
    assert torch.equal(losses, torch.tensor([[1.0, -2.0]]))  # -0.5 * A * log p
    dpo = DPOModule(model_name_or_path=tiny_model_dir, loss_type=f"{tmp_path / 'mine.py'}:gapped_margin", loss_args={"gap": 1.0})
    # beta 0.1 x margin 10 - gap 1 = 0: the loss is -log sigmoid(0) = log 2 (without the gap, -log sigmoid(1) = 0.313)
    value = dpo.preference_loss(chosen_logps=torch.tensor([-1.0]), rejected_logps=torch.tensor([-11.0]), beta=0.1)
    assert value.item() == pytest.approx(math.log(2), abs=1e-6)
    with pytest.raises(UserError, match=r"^--model.estimator_args: sclae is not a hyperparameter of scaled_rewards; its hyperparameters"
                                        r" \(keyword arguments with a default, outside the contract\): scale=1.0$"):
        resolved_estimator(f"{tmp_path / 'mine.py'}:scaled_rewards", {"sclae": 3.0})
    with pytest.raises(UserError, match=r"^--model.policy_loss_args: weight is not a hyperparameter of ppo_policy_loss; .*: none$"):
        resolved_policy_loss("ppo", {"weight": 0.5})
    from lit_rlhf.estimators import ESTIMATOR_ARGUMENTS
    from lit_rlhf.plugins import hyperparameter_text, import_function

    scaled = import_function(f"{tmp_path / 'mine.py'}:scaled_rewards", "--model.advantage_estimator")
    assert hyperparameter_text(scaled, ESTIMATOR_ARGUMENTS) == "; scale=1.0"  # what `--help` adds after a table entry's paper
