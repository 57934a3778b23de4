"""FSDP2 on two gloo processes on CPU (configs/strategies/fsdp2.yaml: Lightning's ModelParallelStrategy,
every model sharded block by block in `configure_model`): each process holds half of each weight, a
step trains like one process with the global batch, generation runs while sharded, a checkpoint
resumes, and the export is one whole Hugging Face folder."""

from math import log

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import fit_args
from helpers.multiprocess_fit import fit_and_record
from test_multiprocess import FP32, FSDP2, TwoProcessRun, assert_like_one_process, fit_two_processes, max_difference, pairs_args

pytestmark = pytest.mark.multiprocess

# 2 held-out rows, one batch, per process (sharded, every forward is a collective); 20 training rows, which the
# 2-process run (2 x 2) and the 1-process run (4) split into the same global batches
EVEN_VALIDATION = ["--data.limit", "24", "--data.val_size", "4"]
DPO_FLAGS = ["--model.learning_rate", "1e-3", *EVEN_VALIDATION]
LORA_FLAGS = ["--model.learning_rate", "1e-3", "--model.lora_r", "4", "--model.precompute_ref_logps", "true", *EVEN_VALIDATION]


def grpo_args(model_dir: str, reward_dir: str, rows) -> list[str]:
    return fit_args(
        "lit_rlhf.ppo.PPOModule", model_dir, rows, "--model.reward_model_path", reward_dir, "--model.advantage_estimator", "grpo",
        "--model.num_generations", "2", "--model.response_length", "6", "--model.ppo_epochs", "1", "--model.gradient_accumulation_steps", "2",
        "--model.learning_rate", "1e-3", "--data.mode", "prompts", "--data.batch_size", "2", *EVEN_VALIDATION, "--seed_everything", "0",
        "--checkpoint.every_n_train_steps", "1", *FP32,
    )  # fmt: skip


@pytest.fixture(scope="module")
def fsdp2(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path_factory) -> dict[str, TwoProcessRun]:
    """The 2-process FSDP2 runs of this file's tests, fitted in one launch: GRPO one step, then resumed from its
    step-1 checkpoint for a second."""
    root = tmp_path_factory.mktemp("fsdp2")
    grpo = grpo_args(tiny_model_dir, tiny_reward_dir, real_rows)
    return fit_two_processes({
        "dpo": TwoProcessRun(pairs_args("lit_rlhf.dpo.DPOModule", tiny_model_dir, real_rows, 2, 1, *DPO_FLAGS), root / "dpo"),
        "grpo": TwoProcessRun([*grpo, "--trainer.max_steps", "1"], root / "grpo"),
        "grpo_resumed": TwoProcessRun([*grpo, "--trainer.max_steps", "2", "--ckpt_path", str(root / "grpo/logs/ppo/version_0/checkpoints/last.ckpt")],
                                      root / "grpo"),
        "dpo_lora": TwoProcessRun(pairs_args("lit_rlhf.dpo.DPOModule", tiny_model_dir, real_rows, 2, 1, *LORA_FLAGS), root / "dpo_lora"),
    }, FSDP2)  # fmt: skip


def assert_half_of_the_weights_each(rank0: dict, rank1: dict) -> None:
    assert 0.4 < rank0["local_share"] < 0.6 and 0.4 < rank1["local_share"] < 0.6
    assert rank0["local_share"] + rank1["local_share"] == pytest.approx(1.0)


def assert_export_is_the_trained_weights(folder, record: dict) -> None:
    """The exported folder loads in plain transformers and holds the trained policy's final weights."""
    exported = AutoModelForCausalLM.from_pretrained(folder)
    final = {k.removeprefix("model."): v for k, v in record["weights"][-1].items() if k.startswith("model.")}
    state = exported.state_dict()
    assert final and all(torch.equal(state[k], v) for k, v in final.items())


def test_dpo_sharded_over_two_processes_trains_like_one_and_exports_whole(fsdp2, tiny_model_dir, real_rows, tmp_path, monkeypatch):
    rank0, rank1 = fsdp2["dpo"].ranks
    monkeypatch.chdir(tmp_path)
    one = fit_and_record(pairs_args("lit_rlhf.dpo.DPOModule", tiny_model_dir, real_rows, 4, 1, *DPO_FLAGS))
    assert_half_of_the_weights_each(rank0, rank1)
    assert rank0["metrics"][0]["loss"] == pytest.approx(log(2), abs=1e-6)  # policy == reference at step 0
    # float32: the same tolerances as DDP's (1e-5 on the weights after one AdamW step of 1e-3)
    assert_like_one_process(rank0, rank1, one, ("loss", "rewards/accuracies", "logps/chosen", "logps/rejected"))
    assert rank0["final_metrics"]["val_loss"] == pytest.approx(one["final_metrics"]["val_loss"], abs=1e-5)
    assert "val_generations/eos_share" in rank0["final_metrics"]  # the monitor generated while sharded
    assert rank0["exported"] and not rank1["exported"]
    assert_export_is_the_trained_weights(fsdp2["dpo"].out_dir / "logs/dpo/version_0/hf", rank0)


def test_grpo_sharded_over_two_processes_generates_trains_and_resumes(fsdp2):
    rank0, rank1 = fsdp2["grpo"].ranks
    assert_half_of_the_weights_each(rank0, rank1)
    assert rank0["metrics"][0]["objective/kl"] == rank1["metrics"][0]["objective/kl"] == 0.0  # first rollout: policy == reference
    assert not set(rank0["train_rows"][0]) & set(rank1["train_rows"][0])  # each process rolls out its own prompts
    assert max_difference(rank0["weights"][0], rank0["initial_weights"]) > 1e-4
    assert_export_is_the_trained_weights(fsdp2["grpo"].out_dir / "logs/ppo/version_0/hf", rank0)
    # resumed from the step-1 checkpoint: the sharded weights come back as they were saved, and one more step runs
    resumed0, resumed1 = fsdp2["grpo_resumed"].ranks
    assert max_difference(resumed0["initial_weights"], rank0["weights"][0]) == 0.0
    assert resumed0["global_step"] == resumed1["global_step"] == 2 and len(resumed0["metrics"]) == 1
    assert not set(resumed0["train_rows"][0]) & set(rank0["train_rows"][0])  # the next prompts, not the first ones again


def test_dpo_with_lora_and_precomputed_reference_sharded_trains_like_one_process(fsdp2, tiny_model_dir, real_rows, tmp_path, monkeypatch):
    """LoRA adapters sharded with their blocks, the reference (the adapter disabled) computed once over both
    processes' shares of the rows: the step and the merged export equal one process's."""
    rank0, rank1 = fsdp2["dpo_lora"].ranks
    monkeypatch.chdir(tmp_path)
    one = fit_and_record(pairs_args("lit_rlhf.dpo.DPOModule", tiny_model_dir, real_rows, 4, 1, *LORA_FLAGS))
    assert_half_of_the_weights_each(rank0, rank1)
    assert set(rank0["weights"][0]) == set(one["weights"][0]) and all("lora_" in k for k in one["weights"][0])
    assert rank0["metrics"][0]["loss"] == pytest.approx(log(2), abs=1e-6)
    assert_like_one_process(rank0, rank1, one, ("loss", "rewards/accuracies", "logps/chosen", "logps/rejected"))
    sharded = AutoModelForCausalLM.from_pretrained(fsdp2["dpo_lora"].out_dir / "logs/dpo/version_0/hf").state_dict()
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "logs/dpo/version_0/hf").state_dict()
    assert max_difference(sharded, whole) < 1e-5  # adapters merged into whole weights, as one process exports them
