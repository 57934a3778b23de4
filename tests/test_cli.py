"""Every config parses; `--help` documents every flag."""

import inspect
from pathlib import Path

import pytest
import yaml

from lit_rlhf.base import AlignmentModule
from lit_rlhf.cli import main
from lit_rlhf.data import PreferenceDataModule

CONFIGS = sorted((Path(__file__).parents[1] / "configs").rglob("*.yaml"))


def init_params(cls) -> list[str]:
    return [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "kwargs")]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
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


def test_configs_cover_every_algorithm():
    names = {p.name for p in CONFIGS if p.parent.name == "configs"}
    assert {"reward.yaml", "dpo.yaml"} <= names


@pytest.mark.parametrize("config", [p for p in CONFIGS if p.parent.name == "configs"], ids=lambda p: p.name)
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


def test_without_a_config_fit_runs_one_epoch(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model", "lit_rlhf.dpo.DPOModule", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["max_epochs"] == 1
