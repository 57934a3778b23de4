"""`lit-rlhf demo`'s wiring, with the training and the evaluation replaced by recorders."""

import json
import os
from pathlib import Path

import pytest

from lit_rlhf import demo
from lit_rlhf.processes import in_own_process  # the fixture below replaces the demo's for every test


@pytest.fixture(autouse=True)
def stages_in_this_process(monkeypatch):
    """The recorders below live in this process: run the demo's stages here, not each in a process of its own."""
    monkeypatch.setattr(demo, "in_own_process", lambda function, *args: function(*args))


def test_a_stage_runs_in_a_process_of_its_own_and_its_errors_reach_the_caller(capsys):
    assert in_own_process(os.getpid) != os.getpid()
    peak = float(capsys.readouterr().err.split("peak memory ")[1].split()[0])  # GiB: an interpreter's, not this one's
    assert 0 < peak < 1
    with pytest.raises(ValueError, match="invalid literal"):
        in_own_process(int, "not a number")


def test_seeds_train_policies_apart_and_reach_the_report_by_name(monkeypatch):
    fits, evaluations = [], []
    monkeypatch.setattr(demo, "fetch_smollm2", lambda model_dir: Path("/models/base"))
    monkeypatch.setattr(demo, "fit", lambda config, *flags: fits.append((config, flags)) or Path(f"/runs/{len(fits)}/hf"))
    monkeypatch.setattr(demo, "self_play_rows", lambda base: f"{base}/self_play.jsonl")
    monkeypatch.setattr(demo.evaluate, "main", evaluations.append)
    demo.main(["--seeds", "1", "2"])
    assert [config for config, _ in fits] == ["reward.yaml", "reward.yaml", "ppo.yaml", "dpo.yaml", "ppo.yaml", "dpo.yaml"]
    for (_, flags), seed in zip(fits[2:], ["1", "1", "2", "2"]):  # the policies: each seed sets the training order and sampling
        assert " ".join(flags).count(f"--seed_everything {seed} --data.shuffle_seed {seed}") == 1
    for config, flags in fits:  # DPO reads the rows whose rejected answers are base's own (written once), the others the shipped rows
        rows = "/models/base/self_play.jsonl" if config == "dpo.yaml" else str(demo.SHIPPED_ROWS)
        assert flags[flags.index("--data.dataset") + 1] == rows and flags.count("--data.dataset") == 1
    assert all("--seed_everything" not in flags for _, flags in fits[:2])  # the reward models are trained once
    (args,) = evaluations
    models = json.loads(args[args.index("--models") + 1])
    assert models == {"base": "/models/base", "dpo@1": "/runs/4/hf", "dpo@2": "/runs/6/hf", "ppo@1": "/runs/3/hf", "ppo@2": "/runs/5/hf"}
    assert args[args.index("--heldout_dataset") + 1] == str(demo.FINAL_ROWS) and args[args.index("--prompts") + 1] == "[]"


def test_one_seed_names_the_policies_plainly_and_tuning_reads_the_held_out_split(monkeypatch):
    evaluations = []
    monkeypatch.setattr(demo, "fetch_smollm2", lambda model_dir: Path("/models/base"))
    monkeypatch.setattr(demo, "fit", lambda config, *flags: Path(f"/runs/{config}"))
    monkeypatch.setattr(demo, "self_play_rows", lambda base: "/runs/self_play.jsonl")
    monkeypatch.setattr(demo.evaluate, "main", evaluations.append)
    demo.main(["--prompts", "tuning"])
    (args,) = evaluations
    assert set(json.loads(args[args.index("--models") + 1])) == {"base", "dpo", "ppo"}
    assert "--heldout_dataset" not in args


def test_demo_stages_write_no_checkpoints(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    """A 135M checkpoint with its optimizer state is 1.5 GB: 3 seeds of checkpoints filled a disk. The demo's
    flags turn them off in Lightning's ModelCheckpoint."""
    from lit_rlhf.cli import cli

    monkeypatch.chdir(tmp_path)
    run = cli(["-c", str(demo.DEMO_CONFIGS / "reward.yaml"), *demo.NO_CHECKPOINTS, "--model.model_name_or_path", tiny_model_dir,
               "--data.dataset", str(real_rows)], run=False)  # fmt: skip
    assert run.trainer.checkpoint_callback.save_last is False and run.trainer.checkpoint_callback.save_top_k == 0


def test_self_play_rows_are_written_for_the_dpo_stages_rows_into_a_new_run_folder(tmp_path, monkeypatch):
    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo.self_play, "main", calls.append)
    first, second = demo.self_play_rows("/models/base"), demo.self_play_rows("/models/base")
    assert (first, second) == (str(Path("logs/self_play/version_0/rows.jsonl")), str(Path("logs/self_play/version_1/rows.jsonl")))
    args = calls[0]
    assert args[args.index("--model") + 1] == "/models/base" and args[args.index("--output") + 1] == first
    assert args[args.index("--limit") + 1] == "360"  # dpo.yaml's --data.limit: the rows DPO splits and trains on


def test_progress_scales_the_reference_times_by_this_machines_speed(monkeypatch, capsys):
    clock = iter([0.0, 0.0, 200.0])  # start, first stage starts, second stage starts 200 s later
    monkeypatch.setattr(demo.time, "time", lambda: next(clock))
    progress = demo.Progress([100, 300])  # the reference machine: 100 s, then 300 s
    progress.next("first")
    progress.next("second")  # the first stage took twice the reference: the second should take 600 s
    first, second = capsys.readouterr().err.splitlines()
    assert first == "[demo 1/2] first: 0.0 min so far, about 7 min left"  # 400 s at the reference speed
    assert second == "[demo 2/2] second: 3.3 min so far, about 10 min left"


def test_demo_verifiable_calculator_trains_with_the_tool_and_evaluates_with_it(tmp_path, monkeypatch):
    """The calculator task: its problems teach the tool, GRPO trains on them with the config's tools, and
    task-accuracy answers in conversations with the same tools and limits; arithmetic keeps its two estimators."""
    fits, evaluations = [], []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "fetch_smollm2", lambda model_dir: Path("/models/base"))
    monkeypatch.setattr(demo, "fit", lambda config, *flags: fits.append((config, flags)) or Path(f"/runs/{len(fits)}/hf"))
    monkeypatch.setattr(demo.tasks, "main", evaluations.append)
    demo.verifiable(["--task", "calculator", "--heldout", "20"])
    [(config, flags)] = fits
    assert config == "calculator.yaml" and flags[flags.index("--data.dataset") + 1] == "logs/calculator/train.jsonl"
    first = json.loads(Path("logs/calculator/train.jsonl").read_text().splitlines()[0])
    assert first["prompt"][-1]["content"].split()[3] == "times" and len(Path("logs/calculator/heldout.jsonl").read_text().splitlines()) == 20
    (args,) = evaluations
    assert json.loads(args[args.index("--models") + 1]) == {"base": "/models/base", "grpo": "/runs/1/hf"}
    assert [args[args.index(flag) + 1] for flag in ("--tools", "--max_turns", "--max_rollout_tokens")] == ['["calculator"]', "3", "160"]
    demo.verifiable(["--heldout", "20"])
    assert [config for config, _ in fits[1:]] == ["arithmetic.yaml"] * 2 and "--tools" not in evaluations[1]
