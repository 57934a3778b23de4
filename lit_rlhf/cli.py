"""`lit-rlhf`: LightningCLI for training (fit/validate/test) plus the offline helpers."""

import sys
import warnings
from pathlib import Path

import yaml

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lit_rlhf.base import AlignmentModule
from lit_rlhf.data import PreferenceDataModule
from lit_rlhf.errors import UserError
from lit_rlhf import demo, evaluate, smollm2

COMMANDS = {"evaluate": evaluate.main, "fetch-smollm2": smollm2.main, "demo": demo.main}


class LitRLHFCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.tokenizer_name_or_path")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        # one pass over the data, as the published recipes train (Lightning's own default is 1000 epochs)
        parser.set_defaults({"trainer.max_epochs": 1})
        # no_grad rather than inference_mode in evaluation: validation metrics can then also be
        # updated by a later `fit` in the same process (inference tensors refuse in-place updates)
        parser.set_defaults({"trainer.inference_mode": False})

    def instantiate_trainer(self, **kwargs):
        """Log to `logs/<algorithm>/version_N` unless a logger is configured."""
        if self._get(self.config_init, "trainer", default={}).get("logger") in (None, True):
            kwargs["logger"] = TensorBoardLogger("logs", name=self.model.algorithm)
        return super().instantiate_trainer(**kwargs)


# `demo`, the tests and `--help` pass their own args on purpose
warnings.filterwarnings("ignore", message="LightningCLI's args parameter")


def cli(args=None, run: bool = True) -> LitRLHFCLI:
    return LitRLHFCLI(
        AlignmentModule,
        PreferenceDataModule,
        subclass_mode_model=True,
        args=args,
        run=run,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
    )


def configured_model_class(args: list[str]):
    """The `model.class_path` of the last `-c/--config` file in `args` that names one."""
    found = None
    for flag, value in zip(args, args[1:]):
        if flag in ("-c", "--config") and Path(value).is_file():
            model = (yaml.safe_load(Path(value).read_text()) or {}).get("model")
            found = model.get("class_path", found) if isinstance(model, dict) else found
    return found


def main(args=None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "lit-rlhf commands: fit, validate, test (LightningCLI, below); evaluate (compare models);"
            " fetch-smollm2 (offline model); demo (offline pipeline). `lit-rlhf COMMAND --help` explains each.\n"
        )
    try:
        if {"-h", "--help"} & set(argv) and (model_class := configured_model_class(argv)):
            try:  # subclass mode hides --model.* flags from --help; print them after the rest
                cli(args)
            except SystemExit:
                pass
            args = [a for a in argv if a not in ("-h", "--help")] + ["--model.help", model_class]
        cli(args)
    except UserError as err:
        sys.exit(f"lit-rlhf: error: {err}")


if __name__ == "__main__":
    main()
