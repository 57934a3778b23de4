"""What a cluster deals out: preemption, resume at any step, shared folders, full disks, typos, degenerate data."""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_causal_lm
from lit_rlhf.base import AlignmentModule
from lit_rlhf.cli import cli
from lit_rlhf.commands import one_line
from lit_rlhf.ppo import PPOModule
from test_reliability import Killed, fail, ppo_args, reward_args, save_model

EPOCHS_2 = ("--trainer.max_epochs", "2", "--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "-1", "--trainer.limit_val_batches", "0")


def fit_recording(monkeypatch, args, kill_before_batch=None):
    """`(rows, run)`: the row indices of every training batch of `lit-rlhf ARGS`, and the CLI (None when
    killed before its `kill_before_batch`-th batch, counted from 0)."""
    rows = []

    def on_train_batch_start(self, batch, batch_idx):
        if len(rows) == kill_before_batch:
            raise Killed
        rows.append(batch["index"].tolist())

    monkeypatch.setattr(AlignmentModule, "on_train_batch_start", on_train_batch_start, raising=False)
    try:
        return rows, cli(args)
    except Killed:
        return rows, None


# ---- resume at any step ---------------------------------------------------------------------


@pytest.mark.parametrize("ckpt", ["epoch=0-step=6.ckpt", "last.ckpt", "last"])
def test_resume_at_an_epoch_boundary_trains_the_next_epoch(tiny_model_dir, real_rows, tmp_path, monkeypatch, ckpt):
    monkeypatch.chdir(tmp_path)
    args = reward_args(tiny_model_dir, real_rows, *EPOCHS_2)
    uninterrupted, _ = fit_recording(monkeypatch, args)
    assert len(uninterrupted) == 12  # 2 epochs of 6 batches
    killed, _ = fit_recording(monkeypatch, args, kill_before_batch=6)  # the checkpoints end with epoch 0
    version_1 = tmp_path / "logs/reward/version_1"
    path = ckpt if ckpt == "last" else str(version_1 / "checkpoints" / ckpt)
    resumed, run = fit_recording(monkeypatch, [*args, "--ckpt_path", path])
    assert killed + resumed == uninterrupted
    assert run.trainer.global_step == 12 and run.trainer.current_epoch == 2
    assert Path(run.trainer.log_dir) == version_1.resolve()  # the resumed run goes on in its own folder
    assert "12 optimizer steps" in (version_1 / "hf/README.md").read_text()


def test_a_run_stopped_by_max_steps_resumes_mid_epoch(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = reward_args(tiny_model_dir, real_rows, "--trainer.max_epochs", "2", "--trainer.limit_val_batches", "0")
    uninterrupted, whole = fit_recording(monkeypatch, [*args, "--trainer.max_steps", "8"])
    first, _ = fit_recording(monkeypatch, [*args, "--trainer.max_steps", "2"])  # last.ckpt: 2 of epoch 0's 6 batches
    resumed, run = fit_recording(monkeypatch, [*args, "--trainer.max_steps", "8", "--ckpt_path", "last"])
    assert first + resumed == uninterrupted
    assert run.trainer.current_epoch == whole.trainer.current_epoch and run.trainer.global_step == 8


def test_dynamic_sampling_resumes_row_exact(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path, monkeypatch):
    """A score of the first response token's parity leaves about half the groups flat, so steps take extra batches; a run
    killed at its third step and resumed from last.ckpt samples exactly the prompt rows of one that was not, round by round."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(PPOModule, "score", lambda self, batch, P: (batch["input_ids"][:, P] % 2).float())
    rollout = PPOModule.rollout

    def run(*extra, kill_at_step=None):
        """The prompt rows of every rollout (each round of each step) and those of each step's own batch."""
        rows, steps = [], []

        def recording(self, batch):
            rows.append(batch["index"].tolist())
            return rollout(self, batch)

        def on_train_batch_start(self, batch, batch_idx):
            if len(steps) == kill_at_step:
                raise Killed
            steps.append(batch["index"].tolist())

        monkeypatch.setattr(PPOModule, "rollout", recording)
        monkeypatch.setattr(AlignmentModule, "on_train_batch_start", on_train_batch_start, raising=False)
        args = ppo_args(tiny_model_dir, tiny_reward_dir, real_rows, "--data.limit", "28", "--model.gradient_accumulation_steps", "1",
                        "--model.dynamic_sampling_max_rounds", "2", "--trainer.max_epochs", "2", "--model.advantage_estimator", "grpo",
                        "--model.num_generations", "2", *extra)  # fmt: skip
        try:
            cli(args)
        except Killed:
            pass
        return rows, steps

    uninterrupted, steps = run()
    assert len(uninterrupted) > len(steps)  # some steps took more than their batch
    killed, _ = run(kill_at_step=2)
    resumed, _ = run("--ckpt_path", "last")
    assert killed + resumed == uninterrupted


def test_ckpt_path_last_without_checkpoints_starts_a_new_run(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = cli(reward_args(tiny_model_dir, real_rows, "--trainer.max_steps", "1", "--ckpt_path", "last"))
    assert run.trainer.global_step == 1 and Path(run.trainer.log_dir).name == "version_0"


def test_resuming_a_finished_run_trains_nothing_and_fails(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli(reward_args(tiny_model_dir, real_rows, "--trainer.limit_val_batches", "0"))
    message = fail(reward_args(tiny_model_dir, real_rows, "--trainer.limit_val_batches", "0", "--ckpt_path", "last"))
    assert "this run took no optimizer step (global step 6, epoch 1), so nothing was exported" in message
    assert not (tmp_path / "logs/reward/version_1/hf").exists()


# ---- preemption: a real signal to a real process --------------------------------------------

# `python SCRIPT SIGNUM ARGS`: `lit-rlhf ARGS` whose process of rank 0 sends itself SIGNUM (0: none) during its
# 3rd training step; each process writes the row indices of its batches to `rows<rank>.json`
SIGNALLED_RUN = """
import json, os, sys
from lit_rlhf.base import AlignmentModule
from lit_rlhf.commands import main
rows = []
def on_train_batch_start(self, batch, batch_idx):
    rows.append(batch["index"].tolist())
    with open(f"rows{self.global_rank}.json", "w") as f:
        json.dump(rows, f)
    if len(rows) == 3 and self.global_rank == 0 and int(sys.argv[1]):
        os.kill(os.getpid(), int(sys.argv[1]))
AlignmentModule.on_train_batch_start = on_train_batch_start
if __name__ == "__main__":  # the DDP launcher runs this file again for process 1
    main(sys.argv[2:])
"""


def start_signalled_run(folder: Path, signum: int, args: list[str]) -> subprocess.Popen:
    """`lit-rlhf ARGS` in `folder`, started, whose process of rank 0 sends itself `signum` during its 3rd step (0: none)."""
    script = folder / "signalled_run.py"
    script.write_text(SIGNALLED_RUN)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.Popen([sys.executable, str(script), str(signum), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=folder,
                            env=env)  # fmt: skip


def finished(run: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = run.communicate(timeout=300)
    finally:
        run.kill()
    return subprocess.CompletedProcess(run.args, run.returncode, stdout, stderr)


def signalled_run(folder: Path, signum: int, args: list[str]) -> subprocess.CompletedProcess:
    return finished(start_signalled_run(folder, signum, args))


SIGNALS = {"reward-SIGTERM": ("reward", signal.SIGTERM), "reward-SIGINT": ("reward", signal.SIGINT), "dpo-SIGTERM": ("dpo", signal.SIGTERM),
           "ppo-SIGTERM": ("ppo", signal.SIGTERM)}  # fmt: skip


def signal_args(algorithm: str, model_dir: str, reward_dir: str, rows) -> list[str]:
    if algorithm == "ppo":
        return ppo_args(model_dir, reward_dir, rows, "--data.limit", "24", "--data.batch_size", "4")
    args = reward_args(model_dir, rows, "--trainer.limit_val_batches", "0")
    args[2] = {"reward": "lit_rlhf.reward.RewardModule", "dpo": "lit_rlhf.dpo.DPOModule"}[algorithm]
    return args


@pytest.fixture(scope="module")
def signalled(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The signalled run of each of `SIGNALS`, each in a folder of its own, all started at once (a start-up mostly
    imports, on one core): name -> (its folder, the finished process)."""
    runs = {}
    for name, (algorithm, signum) in SIGNALS.items():
        folder = tmp_path_factory.mktemp(name)
        runs[name] = folder, start_signalled_run(folder, int(signum), signal_args(algorithm, tiny_model_dir, tiny_reward_dir, real_rows))
    return {name: (folder, finished(run)) for name, (folder, run) in runs.items()}


@pytest.mark.parametrize("name", list(SIGNALS))
def test_a_signal_ends_the_step_writes_a_checkpoint_and_the_resume_is_row_exact(signalled, tiny_model_dir, tiny_reward_dir, real_rows, tmp_path,
                                                                                monkeypatch, name):  # fmt: skip
    """The run signalled during its 3rd step finishes that step, writes last.ckpt and exits 1 naming it; resumed, it
    reads the rows an uninterrupted run (in a folder of its own) reads after them."""
    algorithm, signum = SIGNALS[name]
    folder, killed = signalled[name]
    args = signal_args(algorithm, tiny_model_dir, tiny_reward_dir, real_rows)
    monkeypatch.chdir(tmp_path)
    uninterrupted, _ = fit_recording(monkeypatch, args)
    assert len(uninterrupted) == (5 if algorithm == "ppo" else 6)
    ckpt = (folder / f"logs/{algorithm}/version_0/checkpoints/last.ckpt").resolve()
    assert killed.returncode == 1, killed.stderr[-3000:]
    last_line = killed.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"lit-rlhf: error: interrupted by {signum.name}") and f"checkpoint written to {ckpt};" in last_line
    assert not (folder / f"logs/{algorithm}/version_0/hf").exists()
    assert "weights_only" not in killed.stderr  # the checkpoint is saved whole on purpose: no warning about it
    killed_rows = json.loads((folder / "rows0.json").read_text())
    assert killed_rows == uninterrupted[:3]  # the step in progress finished, nothing after it started
    monkeypatch.chdir(folder)
    resumed, run = fit_recording(monkeypatch, [*args, "--ckpt_path", "last"])
    assert killed_rows + resumed == uninterrupted
    assert Path(run.trainer.log_dir) == ckpt.parent.parent


def test_concurrent_atomic_writers_leave_one_whole_copy_and_nothing_else(tmp_path):
    from lit_rlhf.atomic import written_atomically

    target = tmp_path / "cache.pt"
    with written_atomically(target) as first, written_atomically(target) as second:  # two runs write at once
        first.write_text("first run's table")
        second.write_text("second run's table")
    assert target.read_text() == "first run's table" and [p.name for p in tmp_path.iterdir()] == ["cache.pt"]
    with pytest.raises(KeyboardInterrupt), written_atomically(target) as third:
        third.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "first run's table" and [p.name for p in tmp_path.iterdir()] == ["cache.pt"]


@pytest.mark.multiprocess
def test_a_signal_to_one_process_of_a_ddp_run_stops_all_at_the_same_step(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = reward_args(tiny_model_dir, real_rows, "--data.limit", "40", "--data.batch_size", "2", "--trainer.limit_val_batches", "0",
                       "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.precision", "32-true")  # fmt: skip
    killed = signalled_run(tmp_path, int(signal.SIGTERM), args)  # to process 0 only
    assert killed.returncode == 1, killed.stderr[-3000:]
    assert killed.stderr.strip().splitlines()[-1].startswith("lit-rlhf: error: interrupted by SIGTERM at step 3, epoch 0")
    assert torch.load(tmp_path / "logs/reward/version_0/checkpoints/last.ckpt", weights_only=False)["global_step"] == 3
    killed_rows = [json.loads((tmp_path / f"rows{rank}.json").read_text()) for rank in (0, 1)]
    assert [len(rows) for rows in killed_rows] == [3, 3]
    resumed = signalled_run(tmp_path, 0, [*args, "--ckpt_path", "last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    resumed_rows = [json.loads((tmp_path / f"rows{rank}.json").read_text()) for rank in (0, 1)]
    seen = [i for rows in killed_rows + resumed_rows for batch in rows for i in batch]
    assert len(seen) == 36 and len(set(seen)) == 36  # the 36 training rows, each once: none lost, none repeated
    assert (tmp_path / "logs/reward/version_0/hf/model.safetensors").is_file()


# ---- data flags on resume -------------------------------------------------------------------


def test_resuming_with_other_data_flags_is_refused(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli(reward_args(tiny_model_dir, real_rows, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"))
    ckpt = str(tmp_path / "logs/reward/version_0/checkpoints/last.ckpt")  # mid-epoch
    other_rows = tmp_path / "other.jsonl"  # the same rows in another order
    other_rows.write_text("".join(reversed(real_rows.read_text().splitlines(keepends=True))))
    changes = {"--data.seed": ("7", 42), "--data.batch_size": ("2", 4), "--data.limit": ("20", 28), "--data.offset": ("3", 0),
               "--data.val_size": ("6", 4), "--data.max_length": ("80", 64), "--data.dataset": (str(other_rows), str(real_rows))}  # fmt: skip
    for flag, (value, saved) in changes.items():
        message = fail(reward_args(tiny_model_dir, real_rows, flag, value, "--ckpt_path", ckpt))
        given = int(value) if value.isdigit() else value
        assert f"with other data flags than it was trained with: {flag} {given!r} (checkpoint: {saved!r})" in message
    run = cli(reward_args(tiny_model_dir, real_rows, "--data.seed", "7", "--ckpt_path", ckpt, "--resume_with_changed_data", "true",
                          "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0"))  # fmt: skip
    assert run.trainer.global_step == 3 and run.datamodule.hparams.seed == 7


def test_a_resume_reads_the_same_rows_from_another_path(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    """The dataset copied to another folder (scratch, another mount) is the same data: the resume goes on."""
    monkeypatch.chdir(tmp_path)
    cli(reward_args(tiny_model_dir, real_rows, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"))
    ckpt = str(tmp_path / "logs/reward/version_0/checkpoints/last.ckpt")
    moved = tmp_path / "scratch" / "rows.jsonl"
    moved.parent.mkdir()
    moved.write_bytes(real_rows.read_bytes())
    run = cli(reward_args(tiny_model_dir, moved, "--ckpt_path", ckpt, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0"))
    assert run.trainer.global_step == 3 and run.datamodule.train_sampler.batches_done == 3  # went on at the next batch
    moved.write_text(moved.read_text() + "\n")  # one byte more: not the checkpoint's file
    message = fail(reward_args(tiny_model_dir, moved, "--ckpt_path", ckpt))
    assert f"--data.dataset {str(moved)!r} (checkpoint: {str(real_rows)!r})" in message


# ---- folders --------------------------------------------------------------------------------


def test_default_root_dir_holds_the_logs(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli(reward_args(tiny_model_dir, real_rows, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", "runs/a"))
    assert (tmp_path / "runs/a/logs/reward/version_0/hf/model.safetensors").is_file()
    assert not (tmp_path / "logs").exists()


def test_two_runs_started_together_in_one_folder_get_their_own_versions(tiny_model_dir, real_rows, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    args = reward_args(tiny_model_dir, real_rows, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0")
    code = "from lit_rlhf.commands import main; main()"
    runs = [subprocess.Popen([sys.executable, "-c", code, *args], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stderr.read()[-3000:]
    versions = sorted(p.name for p in (tmp_path / "logs/reward").iterdir())
    assert versions == ["version_0", "version_1"]
    for version in versions:
        assert (tmp_path / "logs/reward" / version / "hf/model.safetensors").is_file()
        assert (tmp_path / "logs/reward" / version / "checkpoints/last.ckpt").is_file()


def test_a_claimed_version_is_never_shared(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import TensorBoardLogger

    from lit_rlhf.runs import RunLogger

    first = RunLogger(str(tmp_path), name="reward")
    assert first.version == 0
    # the second run listed the folder before the first created version_0: its listing says 0 again
    stale = iter([0, 1])
    monkeypatch.setattr(TensorBoardLogger, "_get_next_version", lambda self: next(stale))
    assert RunLogger(str(tmp_path), name="reward").version == 1


# ---- full disks and the error that stopped the run ------------------------------------------


def test_a_full_disk_leaves_no_truncated_checkpoint_and_names_enospc(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    import lit_rlhf.runs

    monkeypatch.chdir(tmp_path)
    saves, real_save = [], torch.save

    def save(obj, f):  # the third checkpoint file fills the disk half-way through, and the disk stays full
        saves.append(f.name)
        if len(saves) >= 3:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f)

    monkeypatch.setattr(lit_rlhf.runs.torch, "save", save)
    message = fail(reward_args(tiny_model_dir, real_rows, "--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "-1"))
    folder = tmp_path / "logs/reward/version_0/checkpoints"
    assert f"ENOSPC: no space left on device while writing checkpoint {folder.resolve() / 'epoch=0-step=2.ckpt'}" in message
    assert "nothing half-written was left, earlier checkpoints are intact" in message
    # the failure checkpoint is tried too, and its own ENOSPC is named after the error that stopped the run
    assert message.endswith(f"no checkpoint could be written (ENOSPC: no space left on device while writing checkpoint {folder.resolve() / 'last.ckpt'};"
                            " nothing half-written was left, earlier checkpoints are intact)")  # fmt: skip
    assert sorted(p.name for p in folder.iterdir()) == ["epoch=0-step=1.ckpt", "last.ckpt"]
    for path in folder.iterdir():
        assert torch.load(path, weights_only=False)["global_step"] == 1


def test_the_one_line_error_is_the_one_that_stopped_the_run():
    try:
        try:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        except OSError:  # handled: the fallback copy then fills the disk
            raise OSError(errno.ENOSPC, "No space left on device", "/ckpts/last.ckpt")
    except OSError as err:
        assert one_line(err) == "OSError: ENOSPC: no space left on device: /ckpts/last.ckpt (run again with --debug for the traceback)"


def test_a_read_only_datasets_cache_tokenizes_in_memory(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    import lit_rlhf.tokenization

    from test_data import make_dm

    monkeypatch.setattr(lit_rlhf.tokenization.os, "access", lambda path, mode: False)  # as a cache shared read-only
    dm = make_dm(tiny_model_dir, real_rows, limit=20, val_size=4, max_length=64, max_prompt_length=32)
    with pytest.warns(UserWarning, match=r"lit_rlhf/tokenized is not writable: the rows are tokenized in memory and not cached"):
        dm.setup("fit")
    assert len(dm.train_rows) == 16


# ---- runs that would not train --------------------------------------------------------------


@pytest.mark.parametrize("flag", ["max_steps", "max_epochs", "limit_train_batches"])
def test_a_run_of_zero_steps_is_refused_before_anything_loads(tiny_model_dir, real_rows, tmp_path, monkeypatch, flag):
    import lit_rlhf.models

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lit_rlhf.models, "_load", lambda *a, **k: pytest.fail("a model was loaded"))
    message = fail(reward_args(tiny_model_dir, real_rows, f"--trainer.{flag}", "0"))
    assert message == f"lit-rlhf: error: --trainer.{flag} 0: the run would train no step and export an untrained model"
    assert not (tmp_path / "logs").exists()


# ---- typos ----------------------------------------------------------------------------------


def test_a_typo_in_a_config_key_is_one_line_with_the_nearest_key(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_typo = tmp_path / "model.yaml"
    model_typo.write_text("model:\n  class_path: lit_rlhf.reward.RewardModule\n  init_args:\n    learning_rat: 0.1\n")
    message = fail([*reward_args(tiny_model_dir, real_rows), "-c", str(model_typo)])
    assert message == "lit-rlhf: error: unknown RewardModule option 'learning_rat'; did you mean 'learning_rate'? (--help lists every flag)"
    trainer_typo = tmp_path / "trainer.yaml"
    trainer_typo.write_text("trainer:\n  max_step: 3\n")
    message = fail([*reward_args(tiny_model_dir, real_rows), "-c", str(trainer_typo)])
    assert message == "lit-rlhf: error: unknown key 'trainer.max_step'; did you mean 'trainer.max_steps'? (--help lists every flag)"
    message = fail([*reward_args(tiny_model_dir, real_rows), "--data.batch_size", "four"])
    assert message.startswith('lit-rlhf: error: Parser key "data.batch_size": Expected a <class \'int\'>. Got value: four')


# ---- degenerate data ------------------------------------------------------------------------


def test_copies_and_ties_are_counted_and_prompts_never_straddle_the_split(tiny_model_dir, real_rows, tmp_path):
    from test_data import make_dm, write_jsonl

    rows = [json.loads(line) for line in real_rows.read_text().splitlines()[:30]]
    same_prompt = [dict(rows[0], chosen=f"answer {i}") for i in range(6)]  # one prompt, six different pairs
    tie = dict(rows[1], prompt="a tie", rejected=rows[1]["chosen"])
    data = write_jsonl(tmp_path / "d.jsonl", rows[1:] + [rows[2]] * 20 + same_prompt + [tie])
    dm = make_dm(tiny_model_dir, data, val_size=10, max_length=64, max_prompt_length=32)
    with pytest.warns(UserWarning, match=r"20 rows are exact copies of an earlier row, 1 have chosen == rejected; they are kept"):
        dm.setup("fit")
    train_prompts = {tuple(r["prompt"]) for r in dm.train_rows}
    assert not train_prompts & {tuple(r["prompt"]) for r in dm.val_rows}
    assert len(dm.train_rows) + len(dm.val_rows) == 29 + 20 + 6 + 1
    deduped = make_dm(tiny_model_dir, data, val_size=10, max_length=64, max_prompt_length=32, dedupe=True)
    deduped.setup("fit")
    assert len(deduped.train_rows) + len(deduped.val_rows) == 29 + 6  # the copies and the tie dropped
    assert not {tuple(r["prompt"]) for r in deduped.train_rows} & {tuple(r["prompt"]) for r in deduped.val_rows}


# ---- models ---------------------------------------------------------------------------------


def test_a_model_folder_without_tokenizer_files_says_so(tokenizer, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_causal_lm(tokenizer).save_pretrained(tmp_path / "no-tokenizer")
    message = fail(reward_args(tmp_path / "no-tokenizer", real_rows))
    assert f"{tmp_path / 'no-tokenizer'} has no tokenizer files (tokenizer.json, tokenizer_config.json" in message


def test_evaluate_names_a_model_with_an_infinite_weight(tiny_model_dir, tiny_reward_dir, tokenizer, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = make_causal_lm(tokenizer)
    with torch.no_grad():
        model.lm_head.weight[3, 1] = float("inf")
    inf_dir = save_model(tmp_path / "inf-model", model, tokenizer)
    evaluate = ["evaluate", "--models", json.dumps({"base": tiny_model_dir, "broken": inf_dir}), "--reward_model", tiny_reward_dir,
                "--data.dataset", str(real_rows), "--data.limit", "12", "--data.val_size", "4", "--data.max_length", "64",
                "--data.max_prompt_length", "32", "--unseen_dataset", str(real_rows.parent / "dolly_sample.jsonl"),
                "--num_generation_prompts", "2", "--max_new_tokens", "2", "--num_rows", "4", "--num_logprob_rows", "2"]  # fmt: skip
    assert f"{inf_dir}: 1 weight tensors hold NaN or infinite values (first: model.embed_tokens.weight)" in fail(evaluate)
