"""A checkpoint is a contract: it runs no code, a resume's flags are applied or refused, a failure or a signal
loses at most the step in progress, and an export is never cut."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_rlhf.base import AlignmentModule
from lit_rlhf.cli import check_same_model, cli
from lit_rlhf.errors import UserError
from lit_rlhf.models import load_causal_lm, load_tokenizer
from conftest import fit_args
from test_reliability import fail, reward_args

ONE_STEP = ("--trainer.max_steps", "1", "--trainer.limit_val_batches", "0")

# a module that leaves a file behind when it is imported: proof that code ran
PAYLOAD = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"


def dpo_args(model_dir, dataset, *extra):
    """`reward_args` (test_reliability.py) for DPO."""
    return ["fit", *fit_args("lit_rlhf.dpo.DPOModule", model_dir, dataset, "--data.limit", "28", "--data.val_size", "4",
                             "--data.batch_size", "4", *extra)]  # fmt: skip


def model_with_remote_code(tiny_model_dir: str, folder: Path, marker: Path) -> Path:
    """A copy of the tiny model whose config names a `.py` file of its own (`auto_map`): loading it with
    `trust_remote_code=True` imports that file, which writes `marker`."""
    shutil.copytree(tiny_model_dir, folder)
    (folder / "payload_model.py").write_text(
        PAYLOAD.format(marker=str(marker)) + "from transformers import LlamaForCausalLM\nclass PayloadForCausalLM(LlamaForCausalLM):\n    pass\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "payload_model.PayloadForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_shared_checkpoint_runs_no_code_on_resume_or_evaluate(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli(dpo_args(tiny_model_dir, real_rows, *ONE_STEP))
    marker, plugin_marker = tmp_path / "model_code_ran", tmp_path / "plugin_code_ran"
    remote = model_with_remote_code(tiny_model_dir, tmp_path / "remote", marker)
    (tmp_path / "payload_loss.py").write_text(PAYLOAD.format(marker=str(plugin_marker)) + "def loss(**kwargs):\n    pass\n")
    # what someone shares: a checkpoint whose saved settings grant remote code and name a plug-in file
    ckpt = torch.load(tmp_path / "logs/dpo/version_0/checkpoints/last.ckpt", weights_only=True)
    ckpt["hyper_parameters"] |= {"trust_remote_code": True, "model_name_or_path": str(remote), "loss_type": f"{tmp_path}/payload_loss.py:loss"}
    ckpt["datamodule_hyper_parameters"]["tokenizer_name_or_path"] = str(remote)
    shared = tmp_path / "shared.ckpt"
    torch.save(ckpt, shared)

    message = fail(dpo_args(remote, real_rows, *ONE_STEP, "--ckpt_path", str(shared)))
    assert "--model.trust_remote_code False (checkpoint: True)" in message and "--model.loss_type 'sigmoid' (checkpoint:" in message
    granted = message.split("a checkpoint never grants ")[1].split(":")[0]
    assert sorted(granted.split(", ")) == ["--model.loss_type", "--model.trust_remote_code"]
    # what `evaluate --checkpoints` and `--models x.ckpt` load: the checkpoint's starting model, without its code
    model, tokenizer = load_causal_lm(str(shared)), load_tokenizer(str(shared))
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.chat_template
    assert not marker.exists() and not plugin_marker.exists()
    load_causal_lm(str(remote), trust_remote_code=True)  # the payload is live: granted on the command line, it runs
    assert marker.read_text() == "ran"


def test_resume_flags_are_applied_or_refused_never_ignored(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli(reward_args(tiny_model_dir, real_rows, *ONE_STEP))  # learning rate 3e-4, margin 0
    ckpt = str(tmp_path / "logs/reward/version_0/checkpoints/last.ckpt")
    message = fail(reward_args(tiny_model_dir, real_rows, *ONE_STEP, "--model.lora_r", "4", "--model.margin", "2", "--ckpt_path", ckpt))
    assert "with other model flags than it was trained with: --model.lora_r 4 (checkpoint: 0)." in message
    assert "--model.margin" not in message.split("(a resume may change")[0]  # margin is applied, not refused

    run = cli(reward_args(tiny_model_dir, real_rows, "--model.margin", "2", "--model.learning_rate", "0.5", "--trainer.max_steps", "2",
                          "--trainer.limit_val_batches", "0", "--ckpt_path", ckpt))  # fmt: skip
    assert run.model.hparams.margin == 2 and run.model.hparams.learning_rate == 0.5
    scheduler = run.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == [0.5] and scheduler.last_epoch == 2
    # the schedule goes on from the new peak: linear decay over the 6 steps of the epoch, 2 taken
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * scheduler.lr_lambdas[0](2))


def test_a_plugin_name_refused_by_the_pure_check():
    saved = {"loss_type": "sigmoid", "beta": 0.1}
    with pytest.raises(UserError, match=r"--model.loss_type 'ipo' \(checkpoint: 'sigmoid'\)\. A resume"):
        check_same_model("x.ckpt", saved, {"loss_type": "ipo", "beta": 0.1}, AlignmentModule.resume_applies + ("beta",))
    check_same_model("x.ckpt", saved, {"loss_type": "sigmoid", "beta": 0.5}, ("beta",))  # applied: no error
    with pytest.raises(UserError, match="never grants --model.loss_type"):
        check_same_model("x.ckpt", {"loss_type": "evil.py:f"}, {"loss_type": "sigmoid"}, ())


class Failure(Exception):
    pass


def record_rows(monkeypatch, fail_before_batch=None) -> list:
    """The row indices of every training batch; raises `Failure` before batch `fail_before_batch` (from 0)."""
    rows = []

    def on_train_batch_start(self, batch, batch_idx):
        if len(rows) == fail_before_batch:
            raise Failure("the reward worker ran out of memory")
        rows.append(batch["index"].tolist())

    monkeypatch.setattr(AlignmentModule, "on_train_batch_start", on_train_batch_start, raising=False)
    return rows


def test_an_exception_after_a_step_writes_last_ckpt_and_the_resume_retrains_the_failed_step(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = reward_args(tiny_model_dir, real_rows, "--trainer.limit_val_batches", "0")  # checkpoints at the epoch's end only
    uninterrupted = record_rows(monkeypatch)
    cli(args)
    failed = record_rows(monkeypatch, fail_before_batch=4)
    message = fail(args)
    ckpt = (tmp_path / "logs/reward/version_1/checkpoints/last.ckpt").resolve()
    assert message == (f"lit-rlhf: error: Failure: the reward worker ran out of memory (run again with --debug for the traceback);"
                       f" checkpoint of step 4 written to {ckpt}; resume with --ckpt_path last")  # fmt: skip
    resumed = record_rows(monkeypatch)
    run = cli([*args, "--ckpt_path", "last"])
    assert failed + resumed == uninterrupted  # the failed batch trains on resume; no row lost or repeated
    assert run.trainer.global_step == 6 and (ckpt.parent.parent / "hf/model.safetensors").is_file()
    assert [p.name for p in ckpt.parent.glob("last*")] == ["last.ckpt"]  # one last.ckpt, the newest (no last-v1.ckpt)
    assert torch.load(ckpt, weights_only=True)["global_step"] == 6


def test_a_failure_before_the_first_step_writes_no_checkpoint(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record_rows(monkeypatch, fail_before_batch=0)
    message = fail(reward_args(tiny_model_dir, real_rows, "--trainer.limit_val_batches", "0"))
    assert message.endswith("(run again with --debug for the traceback)") and "checkpoint" not in message
    assert not (tmp_path / "logs/reward/version_0").exists()


# `python SCRIPT ARGS`: `lit-rlhf ARGS` whose export sends the process SIGTERM once its weights are half written
SIGNAL_IN_EXPORT = """
import os, signal, sys
import lit_rlhf.base
from lit_rlhf.commands import main
export = lit_rlhf.base.export_pretrained
def export_signalled(model, tokenizer, path, readme=""):
    real_save = type(model).save_pretrained
    def save(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save(self, *args, **kwargs)
    type(model).save_pretrained = save
    return export(model, tokenizer, path, readme)
lit_rlhf.base.export_pretrained = export_signalled
main(sys.argv[1:])
"""


def test_sigterm_during_the_export_finishes_the_export_then_exits_1(tiny_model_dir, real_rows, tmp_path):
    script = tmp_path / "signal_in_export.py"
    script.write_text(SIGNAL_IN_EXPORT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    args = reward_args(tiny_model_dir, real_rows, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0")
    done = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    export = (tmp_path / "logs/reward/version_0/hf").resolve()
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"lit-rlhf: error: interrupted by SIGTERM at the end of training: the export was finished first: {export}"
    )
    assert (export / "model.safetensors").is_file() and (export / "README.md").is_file()
    assert not list(export.parent.glob(".hf.*"))


def test_a_run_killed_during_its_export_is_exported_by_resuming_it(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = reward_args(tiny_model_dir, real_rows, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0")

    def killed(model, tokenizer, path, readme=""):
        (path.parent / f".{path.name}.0badc0de.partial").mkdir()  # what a SIGKILL mid-export leaves
        raise Failure("killed")

    monkeypatch.setattr("lit_rlhf.base.export_pretrained", killed)
    fail(args)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "logs/reward/version_0"
    assert not (folder / "hf").exists() and (folder / ".hf.0badc0de.partial").is_dir()
    run = cli([*args, "--ckpt_path", "last"])  # no step left to take: the finished run is exported
    assert Path(run.trainer.log_dir) == folder.resolve() and run.trainer.global_step == 2
    assert (folder / "hf/model.safetensors").is_file() and not list(folder.glob(".hf.*"))
    message = fail([*args, "--ckpt_path", "last"])  # exported once: a second resume trains and exports nothing
    assert "this run took no optimizer step (global step 2, epoch 0), so nothing was exported" in message


def test_a_signal_after_the_last_step_writes_the_checkpoint_it_promised(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def signal_after_the_last_step(self):  # after the last step's check for signals, before the training ends
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(AlignmentModule, "on_train_epoch_end", signal_after_the_last_step, raising=False)
    args = reward_args(tiny_model_dir, real_rows, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--checkpoint.save_last", "false")
    message = fail(args)
    folder = (tmp_path / "logs/reward/version_0").resolve()
    assert message == f"lit-rlhf: error: interrupted by SIGTERM at the end of training: the export was finished first: {folder / 'hf'}"
    assert torch.load(folder / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 2
