"""Every config parses; `--help` documents every flag; `fit` without a config makes one pass; the default precision."""

import inspect
import logging
from pathlib import Path

import pytest
import torch
import yaml

import lit_rlhf.cli
from lit_rlhf import DPOModule, PPOModule, RewardModule
from lit_rlhf.base import AlignmentModule
from lit_rlhf.cli import cli
from lit_rlhf.commands import main
from lit_rlhf.data import PreferenceDataModule
from lit_rlhf.precision import auto_precision, cpu_flags

REPO = Path(__file__).parents[1]
RECIPES = sorted((REPO / "configs").glob("*.yaml"))
DEMO = sorted((REPO / "lit_rlhf" / "configs" / "demo").glob("*.yaml"))  # package data
CONFIGS = RECIPES + DEMO
STRATEGIES = sorted((REPO / "configs" / "strategies").glob("*.yaml"))  # trainer-only fragments, a second -c


def init_params(cls) -> list[str]:
    return [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "kwargs")]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_parses(config, capsys):
    written = yaml.safe_load(config.read_text())
    if "model" in written:  # a training config
        args = ["fit", "-c", str(config), "--print_config"]
    else:  # an evaluation config; the demo fills in the models
        args = ["evaluate", "-c", str(config), "--models", "{base: m}", "--reward_model", "r", "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    for section in ("model", "data"):
        for key, value in written.get(section, {}).get("init_args", written.get(section, {})).items():
            got = printed[section].get("init_args", printed[section]) if section == "model" else printed[section]
            assert got[key] == value, (section, key)


@pytest.mark.parametrize("fragment", STRATEGIES, ids=lambda p: p.name)
def test_every_strategy_fragment_parses_after_a_recipe(fragment, capsys):
    written = yaml.safe_load(fragment.read_text())
    assert set(written) == {"trainer"}
    with pytest.raises(SystemExit) as exit_info:  # the parse imports and checks every class named (LlamaDecoderLayer, ...)
        main(["fit", "-c", str(REPO / "configs" / "dpo.yaml"), "-c", str(fragment), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "lit_rlhf.dpo.DPOModule"  # the recipe is kept
    for key, value in written["trainer"].items():
        if isinstance(value, dict):  # a strategy class: its path and the arguments the fragment sets
            assert printed["trainer"][key]["class_path"] == value["class_path"]
            assert value["init_args"].items() <= printed["trainer"][key]["init_args"].items()
        else:
            assert printed["trainer"][key] == value, key


def test_strategy_fragments_exist():
    assert {p.name for p in STRATEGIES} == {"ddp.yaml", "fsdp.yaml", "fsdp2.yaml", "deepspeed_zero2.yaml"}


@pytest.mark.parametrize("configs", [RECIPES, DEMO], ids=["recipes", "demo"])
def test_configs_cover_every_algorithm(configs):
    classes = {yaml.safe_load(p.read_text()).get("model", {}).get("class_path") for p in configs}
    assert {f"{c.__module__}.{c.__name__}" for c in (RewardModule, PPOModule, DPOModule)} <= classes


@pytest.mark.parametrize("config", RECIPES, ids=lambda p: p.name)
def test_help_documents_every_flag(config, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(config), "--help"])
    out = " ".join(capsys.readouterr().out.split())
    module_path = yaml.safe_load(config.read_text())["model"]["class_path"]
    module_name, cls_name = module_path.rsplit(".", 1)
    cls = getattr(__import__(module_name, fromlist=[cls_name]), cls_name)
    for name in init_params(cls) + init_params(AlignmentModule):
        assert f"--model.{name} " in out, name
    for name in init_params(PreferenceDataModule):
        if name == "tokenizer_name_or_path":  # not a flag: linked to --model.model_name_or_path
            assert "model.init_args.model_name_or_path --> data.tokenizer_name_or_path" in out
            continue
        assert f"--data.{name}" in out, name
    assert "Peak AdamW learning rate" in out and "LoRA rank; 0 trains all weights" in out
    assert "--trainer.max_epochs" in out


def test_without_a_config_fit_makes_one_pass_over_the_rows(tiny_model_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = cli(["fit", "--model", "lit_rlhf.reward.RewardModule", "--model.model_name_or_path", tiny_model_dir,
               "--data.dataset", str(real_rows), "--data.limit", "14", "--data.val_size", "4", "--data.batch_size", "4",
               "--data.max_length", "64", "--data.max_prompt_length", "32", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert run.trainer.current_epoch == 1 and run.trainer.global_step == 3  # 10 rows in batches of 4, once


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx512f avx512_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(cpuinfo) == {"fpu", "sse2", "avx512f", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize(("flags", "expected"), [({"avx512f", "avx512_bf16"}, "bf16-mixed"), ({"amx_bf16"}, "bf16-mixed"),
                                                 ({"avx2", "avx512f"}, "32-true"), (set(), "32-true")])  # fmt: skip
def test_auto_precision_is_bf16_only_with_bf16_units(flags, expected, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    precision, reason = auto_precision(flags)
    assert precision == expected
    assert ("has bf16 matmul units" in reason) == (expected == "bf16-mixed")


def test_precision_is_the_machines_choice_unless_given(tiny_model_dir, real_rows, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(lit_rlhf.cli, "auto_precision", lambda: ("bf16-mixed", "the CPU has bf16 matmul units (amx_bf16)"))
    args = ["--model", "lit_rlhf.reward.RewardModule", "--model.model_name_or_path", tiny_model_dir, "--data.dataset", str(real_rows)]
    with caplog.at_level(logging.INFO):
        assert cli(args, run=False).trainer.precision == "bf16-mixed"
    assert "precision bf16-mixed: the CPU has bf16 matmul units (amx_bf16) (--trainer.precision overrides)" in caplog.text
    assert cli([*args, "--trainer.precision", "32-true"], run=False).trainer.precision == "32-true"


def test_every_flag_of_a_loss_record_is_a_dpo_flag_with_the_records_help(capsys):
    from lit_rlhf.losses import LOSS_FLAGS

    with pytest.raises(SystemExit):
        main(["fit", "-c", str(REPO / "configs" / "dpo.yaml"), "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name, flag in LOSS_FLAGS.items():
        assert name in init_params(DPOModule), f"a loss reads {name}: DPOModule.__init__ needs the argument `{name}: <type> = <default>`"
        assert f"--model.{name} " in out and flag.help in out, name
        assert DPOModule.flag_ranges[name] == flag.range and name in DPOModule.resume_applies


def test_help_lists_every_entry_of_the_tables():
    from lit_rlhf.dpo import DPOModule
    from lit_rlhf.estimators import ESTIMATORS
    from lit_rlhf.losses import PREFERENCE_LOSSES
    from lit_rlhf.ppo import PPOModule
    from lit_rlhf.reward_functions import REWARD_FUNCTIONS

    for name, loss in PREFERENCE_LOSSES.items():
        assert f"`{name}` ({loss.paper})" in DPOModule.__init__.__doc__
    for name, estimator in ESTIMATORS.items():
        assert f"`{name}` ({estimator.paper})" in PPOModule.__init__.__doc__
    assert all(f"`{name}`" in PPOModule.__init__.__doc__ for name in REWARD_FUNCTIONS)
