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
from test_multiprocess import FP32, FSDP2, assert_like_one_process, fit_two_processes, max_difference, pairs_args

pytestmark = pytest.mark.multiprocess

# 2 held-out rows, one batch, per process (sharded, every forward is a collective); 20 training rows, which the
# 2-process run (2 x 2) and the 1-process run (4) split into the same global batches
EVEN_VALIDATION = ["--data.limit", "24", "--data.val_size", "4"]


def assert_half_of_the_weights_each(rank0: dict, rank1: dict) -> None:
    assert 0.4 < rank0["local_share"] < 0.6 and 0.4 < rank1["local_share"] < 0.6
    assert rank0["local_share"] + rank1["local_share"] == pytest.approx(1.0)


def assert_export_is_the_trained_weights(folder, record: dict) -> None:
    """The exported folder loads in plain transformers and holds the trained policy's final weights."""
    exported = AutoModelForCausalLM.from_pretrained(folder)
    final = {k.removeprefix("model."): v for k, v in record["weights"][-1].items() if k.startswith("model.")}
    state = exported.state_dict()
    assert final and all(torch.equal(state[k], v) for k, v in final.items())


def test_dpo_sharded_over_two_processes_trains_like_one_and_exports_whole(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    args = pairs_args("lit_rlhf.dpo.DPOModule", tiny_model_dir, real_rows, 2, 1, "--model.learning_rate", "1e-3", *EVEN_VALIDATION)
    rank0, rank1, _ = fit_two_processes(args, tmp_path / "fsdp2", strategy=FSDP2)
    monkeypatch.chdir(tmp_path)
    one = fit_and_record(pairs_args("lit_rlhf.dpo.DPOModule", tiny_model_dir, real_rows, 4, 1, "--model.learning_rate", "1e-3", *EVEN_VALIDATION))
    assert_half_of_the_weights_each(rank0, rank1)
    assert rank0["metrics"][0]["loss"] == pytest.approx(log(2), abs=1e-6)  # policy == reference at step 0
    # float32: the same tolerances as DDP's (1e-5 on the weights after one AdamW step of 1e-3)
    assert_like_one_process(rank0, rank1, one, ("loss", "rewards/accuracies", "logps/chosen", "logps/rejected"))
    assert rank0["final_metrics"]["val_loss"] == pytest.approx(one["final_metrics"]["val_loss"], abs=1e-5)
    assert "val_generations/eos_share" in rank0["final_metrics"]  # the monitor generated while sharded
    assert rank0["exported"] and not rank1["exported"]
    assert_export_is_the_trained_weights(tmp_path / "fsdp2/logs/dpo/version_0/hf", rank0)


def test_grpo_sharded_over_two_processes_generates_trains_and_resumes(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path):
    args = fit_args(
        "lit_rlhf.ppo.PPOModule", tiny_model_dir, real_rows, "--model.reward_model_path", tiny_reward_dir, "--model.advantage_estimator", "grpo",
        "--model.num_generations", "2", "--model.response_length", "6", "--model.ppo_epochs", "1", "--model.gradient_accumulation_steps", "2",
        "--model.learning_rate", "1e-3", "--data.mode", "prompts", "--data.batch_size", "2", *EVEN_VALIDATION, "--seed_everything", "0",
        "--checkpoint.every_n_train_steps", "1", *FP32,
    )  # fmt: skip
    rank0, rank1, _ = fit_two_processes([*args, "--trainer.max_steps", "1"], tmp_path, strategy=FSDP2)
    assert_half_of_the_weights_each(rank0, rank1)
    assert rank0["metrics"][0]["objective/kl"] == rank1["metrics"][0]["objective/kl"] == 0.0  # first rollout: policy == reference
    assert not set(rank0["train_rows"][0]) & set(rank1["train_rows"][0])  # each process rolls out its own prompts
    assert max_difference(rank0["weights"][0], rank0["initial_weights"]) > 1e-4
    assert_export_is_the_trained_weights(tmp_path / "logs/ppo/version_0/hf", rank0)
    # resumed from the step-1 checkpoint: the sharded weights come back as they were saved, and one more step runs
    last = str(tmp_path / "logs/ppo/version_0/checkpoints/last.ckpt")
    resumed0, resumed1, _ = fit_two_processes([*args, "--trainer.max_steps", "2", "--ckpt_path", last], tmp_path, strategy=FSDP2)
    assert max_difference(resumed0["initial_weights"], rank0["weights"][0]) == 0.0
    assert resumed0["global_step"] == resumed1["global_step"] == 2 and len(resumed0["metrics"]) == 1
    assert not set(resumed0["train_rows"][0]) & set(rank0["train_rows"][0])  # the next prompts, not the first ones again


def test_dpo_with_lora_and_precomputed_reference_sharded_trains_like_one_process(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    """LoRA adapters sharded with their blocks, the reference (the adapter disabled) computed once over both
    processes' shares of the rows: the step and the merged export equal one process's."""
    extra = ["--model.learning_rate", "1e-3", "--model.lora_r", "4", "--model.precompute_ref_logps", "true", *EVEN_VALIDATION]
    rank0, rank1, _ = fit_two_processes(pairs_args("lit_rlhf.dpo.DPOModule", tiny_model_dir, real_rows, 2, 1, *extra), tmp_path / "fsdp2", strategy=FSDP2)
    monkeypatch.chdir(tmp_path)
    one = fit_and_record(pairs_args("lit_rlhf.dpo.DPOModule", tiny_model_dir, real_rows, 4, 1, *extra))
    assert_half_of_the_weights_each(rank0, rank1)
    assert set(rank0["weights"][0]) == set(one["weights"][0]) and all("lora_" in k for k in one["weights"][0])
    assert rank0["metrics"][0]["loss"] == pytest.approx(log(2), abs=1e-6)
    assert_like_one_process(rank0, rank1, one, ("loss", "rewards/accuracies", "logps/chosen", "logps/rejected"))
    sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp2/logs/dpo/version_0/hf").state_dict()
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "logs/dpo/version_0/hf").state_dict()
    assert max_difference(sharded, whole) < 1e-5  # adapters merged into whole weights, as one process exports them
