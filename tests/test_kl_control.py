"""The adaptive KL coefficient: its update by hand, in a PPO run step by step, across a resume, and refused where there is no KL."""

import pytest
import torch

from conftest import fit_args
from lit_rlhf.cli import cli
from lit_rlhf.errors import UserError
from lit_rlhf.kl_control import AdaptiveKLController, adaptive_kl_coef


def test_the_coefficient_follows_the_kl_error_clipped_to_20_percent():
    # above the target by 50 %: the error is clipped to 0.2; 8 rollouts of a 64-rollout horizon: 0.1 * (1 + 0.2 / 8)
    assert adaptive_kl_coef(0.1, kl=6.0, target=4.0, n=8, horizon=64) == pytest.approx(0.1025)
    assert adaptive_kl_coef(0.1, kl=4.4, target=4.0, n=8, horizon=64) == pytest.approx(0.1 * (1 + 0.1 / 8))  # inside the clip
    assert adaptive_kl_coef(0.1, kl=3.0, target=4.0, n=8, horizon=64) == pytest.approx(0.0975)  # -25 % clipped to -20 %
    assert adaptive_kl_coef(0.1, kl=4.0, target=4.0, n=8, horizon=64) == 0.1  # on target: unchanged
    with pytest.raises(UserError, match="--kl_control.target 0: must be > 0"):
        AdaptiveKLController(target=0)


def ppo_args(model_dir, reward_dir, dataset, *extra):
    """4 PPO steps of 8 prompts, one optimizer step each, k3 (never negative), a checkpoint after every step."""
    return ["fit", *fit_args("lit_rlhf.ppo.PPOModule", model_dir, dataset, "--model.reward_model_path", str(reward_dir), "--model.response_length", "8",
            "--data.mode", "prompts", "--data.limit", "36", "--data.val_size", "4", "--data.batch_size", "8", "--trainer.limit_val_batches", "0",
            "--model.ppo_epochs", "1", "--model.gradient_accumulation_steps", "1", "--model.kl_estimator", "k3", "--model.learning_rate", "1e-3",
            "--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "-1", "--kl_control.target", "1e-9", "--kl_control.horizon", "16", *extra)]  # fmt: skip


def test_ppo_adapts_its_kl_coefficient_each_step_and_a_resume_continues_from_it(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ppo_args(tiny_model_dir, tiny_reward_dir, real_rows)
    run = cli([*args, "--trainer.max_steps", "2"])
    metrics = run.trainer.callback_metrics
    # step 1: the policy is the reference, KL 0 (-100 % of the target, clipped to -20 %): 0.05 * (1 - 0.2 * 8 / 16)
    assert metrics["objective/kl_coef"].item() == pytest.approx(0.045)  # what step 2's rewards used
    assert metrics["objective/non_score_reward"].item() == pytest.approx(-0.045 * metrics["objective/kl"].item(), rel=1e-5)
    # step 2: the policy moved, KL above the target (+20 % at most): 0.045 * 1.1
    assert metrics["objective/kl"] > 1e-8 and run.model.hparams.kl_coef == pytest.approx(0.0495)
    ckpt = tmp_path / "logs/ppo/version_0/checkpoints/epoch=0-step=1.ckpt"
    assert torch.load(ckpt, weights_only=True)["callbacks"]["AdaptiveKLController"] == {"kl_coef": pytest.approx(0.045), "step": 1}
    resumed = cli([*args, "--ckpt_path", str(ckpt), "--trainer.max_steps", "2"])  # step 2 again, from the checkpoint's coefficient
    assert resumed.trainer.callback_metrics["objective/kl_coef"].item() == pytest.approx(0.045)  # not --model.kl_coef's 0.05
    assert resumed.model.hparams.kl_coef == pytest.approx(0.0495)


def test_a_kl_target_without_a_kl_is_refused(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="--kl_control.target adapts PPO's KL penalty: it needs .* --model.kl_coef > 0"):
        cli([*ppo_args(tiny_model_dir, tiny_reward_dir, real_rows, "--model.kl_coef", "0"), "--trainer.max_steps", "1"])
    with pytest.raises(UserError, match="--kl_control.target adapts PPO's KL penalty"):
        cli(["fit", *fit_args("lit_rlhf.dpo.DPOModule", tiny_model_dir, real_rows, "--data.limit", "16", "--data.val_size", "4",
                              "--kl_control.target", "4", "--trainer.max_steps", "1")])  # fmt: skip
