"""Two gloo processes on CPU (DDP): disjoint shards, reduced metrics, identical weights, rank-0 export.

The 2-process runs of this file are fitted one after the other in one launch of `tests/helpers/multiprocess_fit.py`
with `--trainer.devices 2 --trainer.strategy ddp` (one start-up for all; a hang fails it at the timeout), the
first time a test asks for them; each test compares what each process saw with a 1-process run of the same global
batch, fitted in this process.
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from math import log
from pathlib import Path

import datasets.config
import pytest
import torch

from conftest import fit_args
from helpers.multiprocess_fit import fit_and_record

pytestmark = pytest.mark.multiprocess

REPO = Path(__file__).parents[1]
SCRIPT = Path(__file__).parent / "helpers" / "multiprocess_fit.py"
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
FSDP2 = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "-c", str(REPO / "configs/strategies/fsdp2.yaml")]
# fp32: the 2-process and 1-process runs are compared to 1e-5, which bf16 rounding of different batch shapes exceeds
FP32 = ["--trainer.precision", "32-true"]


@dataclass
class TwoProcessRun:
    """A run of `fit ARGS` in 2 processes, in `out_dir`, with `env` set; `nan_step` >= 0: process 1's loss at that
    step is NaN. Once fitted: `ranks`, the records of ranks 0 and 1."""

    args: list[str]
    out_dir: Path
    nan_step: int = -1
    env: dict[str, str] = field(default_factory=dict)
    ranks: tuple[dict, dict] = ()


def fit_two_processes(runs: dict[str, TwoProcessRun], strategy: list[str], timeout: float = 600) -> dict[str, TwoProcessRun]:
    """Fit `runs` in order, each with `strategy` (DDP or FSDP2), in one launch of 2 processes; each run's `ranks` set."""
    root = next(iter(runs.values())).out_dir.parent
    plan = [{"name": name, "out_dir": str(run.out_dir), "args": [*run.args, *strategy], "nan_step": run.nan_step, "env": run.env}
            for name, run in runs.items()]  # fmt: skip
    (root / "runs.json").write_text(json.dumps(plan))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, str(SCRIPT), str(root / "runs.json")], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    name = "DDPStrategy" if strategy is DDP else "ModelParallelStrategy"
    for run_name, run in runs.items():
        run.ranks = tuple(torch.load(run.out_dir / f"{run_name}.rank{r}.pt", weights_only=False) for r in (0, 1))
        assert [(r["rank"], r["world_size"], r["strategy"]) for r in run.ranks] == [(0, 2, name), (1, 2, name)]
    return runs


def pairs_args(module: str, model_dir: str, dataset, batch_size: int, steps: int, *extra) -> list[str]:
    """20 training rows, 5 held-out rows (validated after `steps` training batches)."""
    return fit_args(module, model_dir, dataset, "--data.limit", "25", "--data.val_size", "5", "--data.batch_size", str(batch_size),
                    "--trainer.limit_train_batches", str(steps), "--seed_everything", "0", *FP32, *extra)  # fmt: skip


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def rows(batches: list[list[int]]) -> list[int]:
    return [row for batch in batches for row in batch]


def assert_like_one_process(rank0: dict, rank1: dict, one: dict, names: tuple[str, ...]) -> None:
    """Step 0 of the 2-process run (batch B per process) is step 0 of `one` (batch 2B): rows, metrics, weights."""
    assert len(rank0["train_rows"][0]) == len(rank1["train_rows"][0]) == len(one["train_rows"][0]) // 2
    assert not set(rank0["train_rows"][0]) & set(rank1["train_rows"][0])
    assert sorted(rank0["train_rows"][0] + rank1["train_rows"][0]) == sorted(one["train_rows"][0])
    for name in names:  # reduced: both processes log the mean of the two, which is the 1-process value (float32: rel 1e-6)
        assert rank0["metrics"][0][name] == rank1["metrics"][0][name] == pytest.approx(one["metrics"][0][name], rel=1e-6, abs=1e-5), name
    assert max_difference(rank0["weights"][0], rank1["weights"][0]) == 0.0
    step = max_difference(one["weights"][0], one["initial_weights"])  # Adam's first step: about the learning rate
    assert step > 1e-4
    # Adam moves a weight by lr * g / (|g| + eps): where g is near 0 the all-reduce's summation order shows
    # (AVX2 kernels: 1.2e-5 at lr 1e-3); the runs agree to 5 % of the step
    assert max_difference(rank0["weights"][0], one["weights"][0]) < step / 20


def assert_each_held_out_row_counted_once(rank0: dict, rank1: dict, one: dict) -> None:
    val0, val1 = rows(rank0["val_rows"]), rows(rank1["val_rows"])
    assert len(val0) + len(val1) == 5 and not set(val0) & set(val1)
    assert sorted(val0 + val1) == sorted(rows(one["val_rows"]))


PPO_FLAGS = ["--model.response_length", "4", "--model.ppo_epochs", "2", "--model.gradient_accumulation_steps", "2", "--model.learning_rate", "1e-3",
             "--data.mode", "prompts", "--data.limit", "13", "--data.val_size", "3", "--data.batch_size", "2", "--trainer.limit_train_batches", "1",
             "--seed_everything", "0", *FP32]  # fmt: skip
DPO_LR = ["--model.learning_rate", "1e-3"]  # a step moves the weights by about this
PRECOMPUTE = ["--model.precompute_ref_logps", "true"]

RECORDING_REWARD = '''
import json, os


def length_mod_7(prompts, completions, answer, **columns):
    rewards = [float((len(c) + a) % 7) for c, a in zip(completions, answer)]
    with open(os.environ["RECORD_FILE"], "a") as f:
        for p, c, r in zip(prompts, completions, rewards):
            f.write(json.dumps([p, c, r]) + "\\n")
    return rewards
'''


def reward_function_args(model_dir: str, folder: Path) -> list[str]:
    """GRPO on 12 prompt rows written to `folder`, rewarded by `length_mod_7` (which records what it scored), with
    the sanity check's 2 validation batches."""
    rows = [{"prompt": f"What is {i} + {i}?", "answer": 2 * i} for i in range(12)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "judge.py").write_text(RECORDING_REWARD)
    return fit_args(
        "lit_rlhf.ppo.PPOModule", model_dir, folder / "prompts.jsonl", "--model.reward_funcs", f"[{folder}/judge.py:length_mod_7]",
        "--model.advantage_estimator", "grpo", "--model.num_generations", "2", "--model.response_length", "6", "--model.ppo_epochs", "1",
        "--model.gradient_accumulation_steps", "1", "--data.mode", "prompts", "--data.val_size", "4", "--data.batch_size", "2",
        "--trainer.limit_train_batches", "1", "--seed_everything", "0", *FP32, sanity_val_steps=2,
    )  # fmt: skip


@pytest.fixture(scope="module")
def ddp(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path_factory) -> dict[str, TwoProcessRun]:
    """The 2-process DDP runs of this file's tests, fitted in one launch."""
    root = tmp_path_factory.mktemp("ddp")
    (root / "functions").mkdir()
    return fit_two_processes({
        "reward": TwoProcessRun(pairs_args("lit_rlhf.reward.RewardModule", tiny_reward_dir, real_rows, 2, 1), root / "reward"),
        "dpo_nan": TwoProcessRun(pairs_args("lit_rlhf.dpo.DPOModule", tiny_model_dir, real_rows, 2, 2, *DPO_LR, "--model.on_non_finite", "skip"),
                                 root / "dpo_nan", nan_step=1),  # rank 1's second loss is NaN
        "dpo_precompute": TwoProcessRun(pairs_args("lit_rlhf.dpo.DPOModule", tiny_model_dir, real_rows, 2, 1, *PRECOMPUTE), root / "dpo_precompute"),
        "ppo": TwoProcessRun(fit_args("lit_rlhf.ppo.PPOModule", tiny_model_dir, real_rows, "--model.reward_model_path", tiny_reward_dir, *PPO_FLAGS),
                             root / "ppo"),
        "reward_function": TwoProcessRun(reward_function_args(tiny_model_dir, root / "functions"), root / "reward_function",
                                         env={"RECORD_FILE": str(root / "functions/two.jsonl")}),
    }, DDP)  # fmt: skip


def test_reward_model_two_processes_train_like_one_with_the_global_batch(ddp, tiny_reward_dir, real_rows, tmp_path, monkeypatch):
    rank0, rank1 = ddp["reward"].ranks
    monkeypatch.chdir(tmp_path)
    one = fit_and_record(pairs_args("lit_rlhf.reward.RewardModule", tiny_reward_dir, real_rows, 4, 1))
    assert_like_one_process(rank0, rank1, one, ("loss", "accuracy", "margin", "rewards/chosen"))
    assert_each_held_out_row_counted_once(rank0, rank1, one)
    for name in ("val_loss", "val_accuracy", "val_margin"):  # 3 rows on rank 0, 2 on rank 1: weighted, not averaged
        assert rank0["final_metrics"][name] == pytest.approx(one["final_metrics"][name], abs=1e-5), name
    # the export: rank 0 only, after every process has read the log folder (the old gloo crash)
    assert rank0["exported"] and not rank1["exported"]
    assert (ddp["reward"].out_dir / "logs/reward/version_0/hf/model.safetensors").is_file()


def test_dpo_two_processes_train_like_one_and_skip_a_nan_together(ddp, tiny_model_dir, real_rows, tmp_path, monkeypatch):
    rank0, rank1 = ddp["dpo_nan"].ranks  # rank 1's second loss is NaN
    monkeypatch.chdir(tmp_path)
    one = fit_and_record(pairs_args("lit_rlhf.dpo.DPOModule", tiny_model_dir, real_rows, 4, 1, *DPO_LR))
    assert rank0["metrics"][0]["loss"] == pytest.approx(log(2), abs=1e-6)  # policy == reference at step 0
    assert_like_one_process(rank0, rank1, one, ("loss", "rewards/accuracies", "logps/chosen", "logps/rejected"))
    # a NaN on one process: both skip the update (one skipping its backward alone would stall the other)
    assert rank0["non_finite_skips"] == rank1["non_finite_skips"] == 1
    assert max_difference(rank0["weights"][1], rank0["weights"][0]) == max_difference(rank1["weights"][1], rank1["weights"][0]) == 0.0
    assert_each_held_out_row_counted_once(rank0, rank1, one)
    assert rank0["final_metrics"]["val_loss"] == pytest.approx(one["final_metrics"]["val_loss"], abs=1e-5)
    assert rank0["frozen_requires_grad"] == rank1["frozen_requires_grad"] == {"ref_model": False}  # DDP never syncs it


def test_dpo_reference_log_probs_split_over_two_processes_and_rows_tokenized_once(ddp, tiny_model_dir, real_rows, tmp_path, monkeypatch):
    rank0, rank1 = ddp["dpo_precompute"].ranks
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")  # computed here, not read from a file
    one = fit_and_record(pairs_args("lit_rlhf.dpo.DPOModule", tiny_model_dir, real_rows, 4, 1, *PRECOMPUTE))
    # every process ends with the whole table, the one a single process computes
    assert torch.equal(rank0["ref_logps"], rank1["ref_logps"]) and rank0["ref_logps"].shape == (25, 2)
    assert not rank0["ref_logps"].isnan().any() and (rank0["ref_logps"] - one["ref_logps"]).abs().max() < 1e-5
    # each computed its share: 13 rows, and 12 with the last repeated (the same number of batches)
    share0, share1 = rows(rank0["reference_rows"]), rows(rank1["reference_rows"])
    assert len(share0) == len(share1) == 13 and not set(share0) & set(share1) and set(share0) | set(share1) == set(range(25))
    # rank 0 tokenized the rows, rank 1 read them from the cache
    assert len(rank0["tokenized_rows"]) == 25 and rank1["tokenized_rows"] == []
    assert rank0["exported"] and not rank1["exported"]


def test_a_bad_row_stops_both_processes_with_its_own_message(tiny_reward_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"prompt": "a", "chosen": "b" if n < 6 else "", "rejected": "c"}) + "\n" for n in range(7)))
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    args = ["fit", *fit_args("lit_rlhf.reward.RewardModule", tiny_reward_dir, bad, "--data.val_size", "2", *FP32, *DDP, max_length=None)]
    done = subprocess.run([sys.executable, "-m", "lit_rlhf.commands", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    errors = [line for line in done.stderr.splitlines() if line.startswith("lit-rlhf: error:")]
    assert done.returncode == 1 and errors  # rank 0 checks the rows first; rank 1, let go, finds the same row
    assert set(errors) == {f"lit-rlhf: error: {bad}: row 7: field 'chosen' is empty"}, done.stderr[-2000:]


def test_ppo_two_processes_sample_apart_whiten_together_and_end_with_the_same_weights(ddp):
    rank0, rank1 = ddp["ppo"].ranks
    assert rank0["metrics"][0]["objective/kl"] == rank1["metrics"][0]["objective/kl"] == 0.0  # first rollout: policy == reference
    assert len(rank0["train_rows"][0]) == len(rank1["train_rows"][0]) == 2
    assert not set(rank0["train_rows"][0]) & set(rank1["train_rows"][0])
    assert not torch.equal(rank0["rng_state"], rank1["rng_state"])  # the processes sample apart
    # advantages whitened over both processes' tokens: mean 0 and variance 1 together, not on each process
    (a0, m0), (a1, m1) = rank0["advantages"][0], rank1["advantages"][0]
    together = torch.cat([a0[m0.bool()], a1[m1.bool()]])
    assert together.mean().item() == pytest.approx(0.0, abs=1e-5) and together.var().item() == pytest.approx(1.0, abs=1e-4)
    assert abs(a0[m0.bool()].mean().item()) > 1e-3
    # ppo_epochs x num_minibatches optimizer steps, gradients all-reduced: identical weights everywhere
    assert max_difference(rank0["weights"][0], rank1["weights"][0]) == 0.0
    assert max_difference(rank0["weights"][0], rank0["initial_weights"]) > 1e-4
    assert any(k.startswith("value_model.") for k in rank0["weights"][0])
    assert rank0["frozen_requires_grad"] == rank1["frozen_requires_grad"] == {"ref_model": False, "reward_model": False}
    assert "val_objective/scores" in rank0["final_metrics"]  # 2 held-out prompts on rank 0, 1 on rank 1
    assert rank0["exported"] and not rank1["exported"]


def first_rewards(record_file: Path, prompts: set[str]) -> dict[str, list]:
    """The first (completion, reward) a reward function gave each of `prompts`."""
    seen = {}
    for prompt, completion, reward in map(json.loads, record_file.read_text().splitlines()):
        if prompt in prompts:
            seen.setdefault(prompt, [completion, reward])
    return seen


def test_a_reward_function_runs_in_every_process_and_scores_as_in_one(ddp, tiny_model_dir, tmp_path, monkeypatch):
    """Greedy answers to the held-out prompts before training (the sanity check) get the same rewards from the
    function's worker on 2 processes as on 1."""
    rank0, rank1 = ddp["reward_function"].ranks
    assert rank0["metrics"][0]["rewards/length_mod_7/none_share"] == 0.0
    monkeypatch.setenv("RECORD_FILE", str(tmp_path / "one.jsonl"))
    monkeypatch.chdir(tmp_path)
    fit_and_record([*reward_function_args(tiny_model_dir, tmp_path), "--trainer.devices", "1"])
    held_out = {json.loads(line)[0] for line in (tmp_path / "one.jsonl").read_text().splitlines()[:4]}  # the sanity check comes first
    one, two = first_rewards(tmp_path / "one.jsonl", held_out), first_rewards(ddp["reward_function"].out_dir.parent / "functions/two.jsonl", held_out)
    assert len(one) == 4 and one == two
