"""A run never lies about its state: non-finite values, wrong models, resume, flags, exit codes, exports."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import fit_args, make_causal_lm, make_tokenizer
from lit_rlhf.cli import cli
from lit_rlhf.commands import main
from lit_rlhf.models import export_pretrained, load_tokenizer
from lit_rlhf.reward import RewardModule


def fail(args: list[str]) -> str:
    """Run `lit-rlhf ARGS` in-process; it must exit non-zero with one line. Returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("lit-rlhf: error: ") and "\n" not in message, message
    return message


def reward_args(model_dir, dataset, *extra):
    return ["fit", *fit_args("lit_rlhf.reward.RewardModule", model_dir, dataset, "--data.limit", "28", "--data.val_size", "4",
                             "--data.batch_size", "4", *extra)]  # fmt: skip


def ppo_args(model_dir, reward_dir, dataset, *extra):
    return ["fit", *fit_args("lit_rlhf.ppo.PPOModule", model_dir, dataset, "--model.reward_model_path", str(reward_dir),
                             "--model.response_length", "4", "--model.ppo_epochs", "1", "--data.mode", "prompts", "--data.limit", "12",
                             "--data.val_size", "4", "--data.batch_size", "4", "--trainer.limit_val_batches", "0", *extra,
                             model_summary=True)]  # fmt: skip


def save_model(path: Path, model, tokenizer) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# ---- 1. non-finite values ---------------------------------------------------------------------


def test_a_nan_weight_stops_the_run_before_training_and_writes_nothing(tokenizer, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = make_causal_lm(tokenizer)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    nan_dir = save_model(tmp_path / "nan-model", model, tokenizer)
    args = reward_args(nan_dir, real_rows)
    args[2] = "lit_rlhf.dpo.DPOModule"
    message = fail(args)
    assert f"{nan_dir}: 1 weight tensors hold NaN or infinite values (first: model.layers.0.mlp.up_proj.weight)" in message
    assert not list(tmp_path.glob("logs/dpo/version_*"))  # no export, and no empty version folder either


def nan_at_third_call(monkeypatch) -> list[torch.Tensor]:
    """RewardModule's training loss becomes NaN on its third batch. Returns the score head's weights as
    each training batch starts."""
    weights, original = [], RewardModule.shared_step

    def shared_step(self, batch, stage):
        loss = original(self, batch, stage)
        if stage == "train":
            weights.append(self.model.score.weight.detach().clone())
            return loss * float("nan") if len(weights) == 3 else loss
        return loss

    monkeypatch.setattr(RewardModule, "shared_step", shared_step)
    return weights


def test_a_nan_loss_stops_with_step_and_batch_and_keeps_the_last_checkpoint(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    nan_at_third_call(monkeypatch)
    message = fail(reward_args(tiny_model_dir, real_rows, "--checkpoint.every_n_train_steps", "1"))
    assert "non-finite loss (nan) at step 2 (epoch 0, batch 2)" in message
    run_dir = tmp_path / "logs/reward/version_0"
    assert torch.load(run_dir / "checkpoints/last.ckpt", weights_only=False)["global_step"] == 2
    assert not (run_dir / "hf").exists() and not list(run_dir.glob(".hf.*"))


def test_skip_mode_skips_the_nan_batch_and_counts_it(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    weights = nan_at_third_call(monkeypatch)
    run = cli(reward_args(tiny_model_dir, real_rows, "--model.on_non_finite", "skip"))
    assert len(weights) == 6  # 24 rows in batches of 4
    assert not torch.equal(weights[1], weights[2]) and torch.equal(weights[2], weights[3])  # batch 2 changed nothing
    assert run.model.non_finite_skips == 1 and run.trainer.callback_metrics["non_finite_skips"] == 1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "logs/reward/version_0/hf")
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_a_nan_gradient_with_a_finite_loss_is_caught_before_the_step(tiny_model_dir, real_rows, tmp_path, monkeypatch, mode):
    monkeypatch.chdir(tmp_path)
    run = cli(reward_args(tiny_model_dir, real_rows, "--model.on_non_finite", mode, "--trainer.max_steps", "1")[1:], run=False)
    weight = run.model.model.score.weight
    start = weight.detach().clone()
    weight.register_hook(lambda grad: grad * float("nan"))
    if mode == "stop":
        with pytest.raises(Exception, match="non-finite gradient at step 0"):
            run.trainer.fit(run.model, datamodule=run.datamodule)
    else:
        run.trainer.fit(run.model, datamodule=run.datamodule)
        assert run.model.non_finite_skips >= 1
        assert not run.trainer.optimizers[0].state  # AdamW never stepped: no moments were written
    assert torch.equal(weight.detach(), start)  # never stepped with a NaN gradient


def test_ppo_stops_on_nan_scores(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path, monkeypatch):
    import lit_rlhf.ppo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lit_rlhf.ppo.PPOModule, "score", lambda self, batch, P: torch.full((len(batch["input_ids"]),), float("nan")))
    assert "non-finite rollout scores at step 0 (epoch 0, batch 0)" in fail(ppo_args(tiny_model_dir, tiny_reward_dir, real_rows))


# ---- 2. the wrong model ---------------------------------------------------------------------


def test_a_causal_lm_is_refused_as_reward_model(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = fail(ppo_args(tiny_model_dir, tiny_model_dir, real_rows))
    assert f"{tiny_model_dir} is not a reward model: it has no trained score head (missing score.weight)" in message
    evaluate = ["evaluate", "--models", json.dumps({"base": tiny_model_dir}), "--reward_model", tiny_model_dir,
                "--data.dataset", str(real_rows), "--unseen_dataset", str(real_rows.parent / "dolly_sample.jsonl")]  # fmt: skip
    assert "is not a reward model" in fail(evaluate)


def test_a_reward_model_with_another_vocabulary_is_refused(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    monkeypatch.chdir(tmp_path)
    other = make_tokenizer()
    other.add_tokens(["<extra>"])
    config = make_causal_lm(other).config
    config.num_labels = 1
    model = AutoModelForSequenceClassification.from_config(config)
    reward_dir = save_model(tmp_path / "other-vocab-rm", model, other)
    message = fail(ppo_args(tiny_model_dir, reward_dir, real_rows))
    assert "uses another vocabulary (260 tokens) than the policy's tokenizer (259 tokens)" in message


def test_an_empty_reward_model_folder_says_what_to_pass(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert "empty is not a Hugging Face model folder (no config.json)" in fail(ppo_args(tiny_model_dir, tmp_path / "empty", real_rows))


# ---- 3. resume ------------------------------------------------------------------------------


class Killed(Exception):
    pass


def fit_recording(monkeypatch, args, kill_at=None) -> list[list[int]]:
    """The row indices of every training batch of `lit-rlhf ARGS`, killed before global step `kill_at`."""
    rows = []

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == kill_at:
            raise Killed
        rows.append(batch["index"].tolist())

    monkeypatch.setattr(RewardModule, "on_train_batch_start", on_train_batch_start, raising=False)
    try:
        cli(args)
    except Killed:
        pass
    return rows


def test_a_killed_and_resumed_run_sees_the_rows_of_an_uninterrupted_run(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = reward_args(tiny_model_dir, real_rows, "--trainer.max_epochs", "2", "--checkpoint.every_n_train_steps", "1",
                       "--checkpoint.save_top_k", "-1", "--trainer.limit_val_batches", "0")  # fmt: skip
    uninterrupted = fit_recording(monkeypatch, [*args, "--seed_everything", "7"])
    assert len(uninterrupted) == 12 and uninterrupted[:6] != uninterrupted[6:]  # 2 epochs of 6 batches, reshuffled
    killed = fit_recording(monkeypatch, [*args, "--seed_everything", "7"], kill_at=4)  # before step 4 (epoch 0, batch 4)
    ckpt = tmp_path / "logs/reward/version_1/checkpoints/epoch=0-step=4.ckpt"
    # another seed: the order comes from the checkpoint, not from the resumed run's RNG
    resumed = fit_recording(monkeypatch, [*args, "--seed_everything", "8", "--ckpt_path", str(ckpt)])
    assert killed == uninterrupted[:4]
    assert killed + resumed == uninterrupted


def test_a_broken_or_foreign_checkpoint_is_one_line(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli(reward_args(tiny_model_dir, real_rows, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"))
    ckpt = tmp_path / "logs/reward/version_0/checkpoints/last.ckpt"
    half = tmp_path / "half.ckpt"
    half.write_bytes(ckpt.read_bytes()[:2000])
    assert "half.ckpt: not a readable checkpoint" in fail(reward_args(tiny_model_dir, real_rows, "--ckpt_path", str(half)))
    message = fail(ppo_args(tiny_model_dir, tiny_reward_dir, real_rows, "--ckpt_path", str(ckpt)))
    assert "was written by RewardModule, but this run trains PPOModule" in message


# ---- 4. numeric flags -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--data.val_size", "-5", "--data.val_size -5: must be >= 0"),
        ("--data.max_prompt_length", "0", "--data.max_prompt_length 0: must be > 0"),
        ("--data.batch_size", "0", "--data.batch_size 0: must be > 0"),
        ("--data.num_proc", "0", "--data.num_proc 0: must be > 0"),
        ("--model.learning_rate", "-1e-5", "--model.learning_rate -1e-05: must be > 0"),
        ("--model.lora_dropout", "1", "--model.lora_dropout 1.0: must be in [0, 1)"),
    ],
)
def test_numeric_flags_are_checked_before_anything_loads(tiny_model_dir, real_rows, tmp_path, monkeypatch, flag, value, expected):
    import lit_rlhf.models

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lit_rlhf.models, "_load", lambda *a, **k: pytest.fail("a model was loaded"))
    assert fail(reward_args(tiny_model_dir, real_rows, f"{flag}={value}")) == f"lit-rlhf: error: {expected}"


def test_ppo_and_dpo_ranges(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fail(ppo_args(tiny_model_dir, tiny_reward_dir, real_rows, "--model.lam", "1.5")).endswith("--model.lam 1.5: must be in [0, 1]")
    dpo = reward_args(tiny_model_dir, real_rows, "--model.label_smoothing", "0.5")
    dpo[2] = "lit_rlhf.dpo.DPOModule"
    assert fail(dpo).endswith("--model.label_smoothing 0.5: must be in [0, 0.5)")


# ---- 5. exit codes and one-line errors ------------------------------------------------------


def run_console_scripts(*commands: list[str], cwd) -> list[subprocess.CompletedProcess]:
    """`lit-rlhf COMMAND...` for each of `commands`, all at once (each start-up mostly imports, on one core), offline."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    code = "from lit_rlhf.commands import main; main()"
    running = [subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)
               for args in commands]  # fmt: skip
    try:
        outputs = [p.communicate(timeout=300) for p in running]
    finally:
        for p in running:  # a timeout leaves none of them running
            p.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, *output) for p, output in zip(running, outputs)]


def test_console_script_exit_status(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path):
    nowhere = ["fit", "--model", "lit_rlhf.dpo.DPOModule", "--model.model_name_or_path", str(tmp_path / "nowhere")]
    ok, bad, debug = run_console_scripts([
        "evaluate", "--models", json.dumps({"base": tiny_model_dir}), "--reward_model", tiny_reward_dir,
        "--data.dataset", str(real_rows), "--data.limit", "12", "--data.val_size", "4", "--data.max_length", "64",
        "--data.max_prompt_length", "32", "--unseen_dataset", str(real_rows.parent / "dolly_sample.jsonl"),
        "--num_generation_prompts", "3", "--max_new_tokens", "2", "--num_rows", "4", "--num_logprob_rows", "2",
        "--output_dir", "eval"], nowhere, [*nowhere, "--debug"], cwd=tmp_path,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "eval/report.md").is_file()
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith(f"lit-rlhf: error: {tmp_path / 'nowhere'} is not a Hugging Face model folder")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_a_tokenizer_without_chat_template_and_non_utf8_data_are_one_line(tiny_model_dir, tokenizer, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plain = make_tokenizer()
    plain.chat_template = None
    plain_dir = save_model(tmp_path / "no-template", make_causal_lm(plain), plain)
    assert "has no chat template; use an instruct/chat model" in fail(reward_args(plain_dir, real_rows))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes(b'{"prompt": "ok", "chosen": "ok", "rejected": "ok"}\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    assert "latin1.jsonl: line 2: not UTF-8 text" in fail(reward_args(tiny_model_dir, latin1))


def test_an_unreachable_hub_is_not_retried(monkeypatch):
    import datasets
    import huggingface_hub.constants
    import transformers

    import lit_rlhf.models
    from lit_rlhf.rows import load_rows

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # conftest turns it on for every other test
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    lit_rlhf.models.hub_reachable.cache_clear()
    seen = {}

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise OSError("not in the local cache")

    def load_dataset(name, **kwargs):
        seen["datasets_offline"] = datasets.config.HF_HUB_OFFLINE
        raise ConnectionError("not in the local cache")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    try:
        with pytest.raises(ValueError, match="could not load 'someone/some-model'.*pass a local folder"):
            load_tokenizer("someone/some-model")
        with pytest.raises(ValueError, match="could not load dataset 'someone/some-data'.*pass a local file"):
            load_rows("someone/some-data")
    finally:
        lit_rlhf.models.hub_reachable.cache_clear()
    # the local cache or a fast error, no download retries
    assert seen["local_files_only"] is True and seen["datasets_offline"] is True
    assert datasets.config.HF_HUB_OFFLINE is False  # the library's own setting is given back


# ---- nothing lost ---------------------------------------------------------------------------


def test_an_interrupted_export_leaves_no_folder_that_looks_complete(tiny_model_dir, tmp_path, monkeypatch):
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_model_dir), load_tokenizer(tiny_model_dir)
    monkeypatch.setattr(type(tok), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        export_pretrained(model, tok, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.iterdir())  # the half-written copy was removed too
    monkeypatch.undo()
    export_pretrained(model, tok, tmp_path / "hf", readme="card")
    assert (tmp_path / "hf/README.md").read_text() == "card" and [p.name for p in tmp_path.iterdir()] == ["hf"]
    with pytest.raises(ValueError, match="exists already; the export does not overwrite it"):
        export_pretrained(model, tok, tmp_path / "hf")


def test_a_run_that_fails_at_once_leaves_no_version_folder(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": ""}) + "\n")
    fail(reward_args(tiny_model_dir, bad))
    assert not list(tmp_path.glob("logs/reward/version_*"))
    run = cli(reward_args(tiny_model_dir, real_rows, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"))
    assert Path(run.trainer.log_dir).name == "version_0"
