"""The trainer entry: LightningCLI over the alignment modules and the preference DataModule."""

import shutil
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_rlhf.base import AlignmentModule
from lit_rlhf.data import PreferenceDataModule
from lit_rlhf.errors import UserError
from lit_rlhf.precision import auto_precision


class RemoveFailedRunDir(Callback):
    """A run that fails before its first optimizer step (bad data, bad weights, a NaN at step 0) removes
    the `logs/<algorithm>/version_N` folder it created, so it does not shift later version numbers."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        log_dir = Path(trainer.logger.log_dir)
        if trainer.global_step == 0 and trainer.is_global_zero and not any(log_dir.rglob("*.ckpt")):
            shutil.rmtree(log_dir, ignore_errors=True)


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
        # the DataModule's batch sampler shards the rows over processes itself (lit_rlhf/loader.py);
        # Lightning cannot put its DistributedSampler inside a custom batch sampler
        parser.set_defaults({"trainer.use_distributed_sampler": False})

    def _parse_ckpt_path(self) -> None:
        """With `--ckpt_path`, the model settings come from the checkpoint (as in LightningCLI), after
        checks: the file must be a readable checkpoint of the configured module, and every
        `--model.*` value the checkpoint overrides is named in a warning."""
        subcommand = self.config.get("subcommand")
        ckpt_path = subcommand and self.config[subcommand].get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry"):
            return
        if not Path(ckpt_path).is_file():
            raise UserError(f"--ckpt_path {ckpt_path}: no such file")
        try:
            hparams = torch.load(ckpt_path, weights_only=True, map_location="cpu", mmap=True).get("hyper_parameters", {})
        except Exception as err:
            raise UserError(
                f"--ckpt_path {ckpt_path}: not a readable checkpoint ({str(err).split('. ')[0]}); a run killed while"
                " saving leaves such a file: resume from an earlier checkpoint"
            ) from None
        model = self.config[subcommand].model
        written_by = hparams.pop("_class_path", model.class_path)
        hparams.pop("_instantiator", None)
        if written_by != model.class_path:
            raise UserError(
                f"--ckpt_path {ckpt_path} was written by {written_by.rsplit('.', 1)[-1]}, but this run trains"
                f" {model.class_path.rsplit('.', 1)[-1]}; resume with the config that wrote the checkpoint"
            )
        given = model.init_args.as_dict()
        self.config = self.parser.parse_object({subcommand: {"model": {"class_path": written_by, "init_args": hparams}}}, self.config)
        used = self.config[subcommand].model.init_args.as_dict()
        ignored = [f"--model.{k} {given[k]!r} (checkpoint: {used[k]!r})" for k in given if k in used and given[k] != used[k]]
        if ignored:
            rank_zero_warn(f"resuming from {ckpt_path}: the checkpoint's model settings are used; ignored " + ", ".join(ignored))

    def instantiate_trainer(self, **kwargs):
        """Log to `logs/<algorithm>/version_N` unless a logger is configured; without
        `--trainer.precision`, train in the precision this machine runs fast (lit_rlhf/precision.py)."""
        if self._get(self.config_init, "trainer", default={}).get("precision") is None:
            kwargs["precision"], reason = auto_precision()
            rank_zero_info(f"precision {kwargs['precision']}: {reason} (--trainer.precision overrides)")
        default_logger = self._get(self.config_init, "trainer", default={}).get("logger") in (None, True)
        if default_logger:
            kwargs["logger"] = TensorBoardLogger("logs", name=self.model.algorithm)
        trainer = super().instantiate_trainer(**kwargs)
        if default_logger:  # a fresh version folder of ours: safe to remove when the run fails at once
            trainer.callbacks.append(RemoveFailedRunDir())
        return trainer


# `demo`, the tests and `--help` pass their own args on purpose
warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
# the DataModule restores the training order and position itself (lit_rlhf/loader.py)
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


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
