"""Reward model through the CLI: fit, export, reload, resume, and a run that learns."""

import torch
from transformers import AutoModelForSequenceClassification

from conftest import fit_args
from lit_rlhf import sequence_scores
from lit_rlhf.cli import cli


def reward_args(model_dir, dataset, *extra):
    return ["fit", *fit_args("lit_rlhf.reward.RewardModule", model_dir, dataset, *extra, max_length=96, max_prompt_length=48,
                             sanity_val_steps=None)]  # fmt: skip


def test_fit_exports_a_model_that_reloads_to_the_same_scores(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = cli(reward_args(tiny_model_dir, real_rows, "--data.limit", "24", "--data.val_size", "8", "--trainer.max_steps", "2"))
    log_dir = tmp_path / "logs" / "reward" / "version_0"
    assert run.trainer.log_dir == str(log_dir.resolve())
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    reloaded = AutoModelForSequenceClassification.from_pretrained(log_dir / "hf").eval()
    batch = next(iter(run.datamodule.val_dataloader()))
    with torch.no_grad():
        expected = sequence_scores(run.model.model.eval(), batch)
        got = sequence_scores(reloaded, batch)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, torch.zeros_like(got))


def test_resume_continues_an_interrupted_run(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = reward_args(tiny_model_dir, real_rows, "--data.limit", "40", "--data.val_size", "8", "--data.batch_size", "4",
                         "--trainer.max_epochs", "1", "--checkpoint.every_n_train_steps", "2", "--checkpoint.save_top_k", "-1")  # fmt: skip
    cli([*common, "--trainer.max_steps", "3"])  # "interrupted" after step 3 of 8
    ckpt = tmp_path / "logs" / "reward" / "version_0" / "checkpoints" / "epoch=0-step=2.ckpt"
    assert torch.load(ckpt, weights_only=False)["global_step"] == 2
    resumed = cli([*common, "--ckpt_path", str(ckpt)])
    assert resumed.trainer.global_step == 8  # 32 training rows / batch 4: the epoch was finished, not restarted
    assert resumed.trainer.log_dir.endswith("version_1")


def test_short_run_on_real_rows_raises_validation_accuracy(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = cli(
        reward_args(tiny_model_dir, real_rows, "--data.limit", "400", "--data.val_size", "64", "--data.batch_size", "8",
                    "--model.learning_rate", "3e-3", "--trainer.max_epochs", "2", "--seed_everything", "0")[1:],
        run=False,
    )  # fmt: skip
    before = run.trainer.validate(run.model, datamodule=run.datamodule, verbose=False)[0]["val_accuracy"]
    run.trainer.fit(run.model, datamodule=run.datamodule)
    after = run.trainer.callback_metrics["val_accuracy"].item()
    assert after > before + 0.15, (before, after)
