"""The trainer entry: LightningCLI over the alignment modules and the preference DataModule."""

import warnings

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from lit_rlhf.base import AlignmentModule
from lit_rlhf.data import PreferenceDataModule


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
    """`lit-rlhf fit|validate|test ...` in-process; `run=False` builds the trainer, model and data only."""
    return LitRLHFCLI(
        AlignmentModule,
        PreferenceDataModule,
        subclass_mode_model=True,
        args=args,
        run=run,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
    )
