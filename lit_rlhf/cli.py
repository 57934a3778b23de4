"""The trainer entry: LightningCLI over the alignment modules and the preference DataModule."""

import difflib
import inspect
import re
import warnings
from argparse import ArgumentError
from importlib import import_module
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lit_rlhf.base import AlignmentModule
from lit_rlhf.data import PreferenceDataModule
from lit_rlhf.errors import UserError
from lit_rlhf.kl_control import AdaptiveKLController
from lit_rlhf.models import read_checkpoint
from lit_rlhf.monitor import GenerationMonitor
from lit_rlhf.precision import auto_precision
from lit_rlhf.rows import content_digest
from lit_rlhf.runs import AtomicCheckpointIO, RemoveFailedRunDir, RunLogger, StopCheckpoint, newest_checkpoint, version_folder


#: DataModule flags that decide which rows train and validate, and in which order: a resumed run refuses
#: to change them (`--resume_with_changed_data true` accepts it)
ROW_FLAGS = ("dataset", "mode", "tokenizer_name_or_path", "max_length", "max_prompt_length", "truncation", "batch_size",
             "val_size", "limit", "offset", "seed", "shuffle_seed", "group_by_length", "dedupe", "split_pairs")  # fmt: skip


class LitRLHFCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.tokenizer_name_or_path")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.add_lightning_class_args(GenerationMonitor, "generations")
        parser.add_lightning_class_args(AdaptiveKLController, "kl_control")
        # one pass over the data, as the published recipes train (Lightning's own default is 1000 epochs)
        parser.set_defaults({"trainer.max_epochs": 1})
        # no_grad rather than inference_mode in evaluation: validation metrics can then also be
        # updated by a later `fit` in the same process (inference tensors refuse in-place updates)
        parser.set_defaults({"trainer.inference_mode": False})
        # the DataModule's batch sampler shards the rows over processes itself (lit_rlhf/loader.py);
        # Lightning cannot put its DistributedSampler inside a custom batch sampler
        parser.set_defaults({"trainer.use_distributed_sampler": False})
        parser.add_argument(
            "--resume_with_changed_data", type=bool, default=False,
            help="With --ckpt_path: accept data flags that differ from the checkpoint's (" + ", ".join(ROW_FLAGS) + ")."
            " Without it such a resume is refused: it would train other rows than the interrupted run.",
        )  # fmt: skip

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        """A resume unpickles tensors and plain containers only (`torch.load`'s `weights_only`): a checkpoint cannot run code."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser.set_defaults({"weights_only": True})
        return parser

    def parse_arguments(self, parser, args) -> None:
        """A typo in a flag or a config key is one line naming the key and the nearest valid one."""
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise UserError(config_error(err, getattr(self, "_subcommand_parsers", None) or {"": parser})) from None

    def _parse_ckpt_path(self) -> None:
        """With `--ckpt_path`, the run is the command line's: nothing in the checkpoint's saved settings is used
        (LightningCLI would take the model settings from it). A checkpoint is data, never permission:
        `trust_remote_code` and plug-in import paths come only from the command line. So the file must be a
        readable checkpoint of the configured module, and a `--model.*` or data flag that differs from the
        checkpoint's is applied if the module lists it in `resume_applies`, else refused in one line.
        `--ckpt_path last` is the newest checkpoint under `<root>/logs/<algorithm>`."""
        subcommand = self.config.get("subcommand")
        self.resume_folder = None  # the version folder a resumed run continues in
        ckpt_path = subcommand and self.config[subcommand].get("ckpt_path")
        if ckpt_path == "last":
            ckpt_path = self.resolve_last(subcommand)
        if not ckpt_path or ckpt_path in ("best", "hpc", "registry"):
            return
        if not Path(ckpt_path).is_file():
            raise UserError(f"--ckpt_path {ckpt_path}: no such file")
        ckpt = read_checkpoint(ckpt_path)
        hparams = ckpt.get("hyper_parameters", {})
        model = self.config[subcommand].model
        written_by = hparams.pop("_class_path", model.class_path)
        hparams.pop("_instantiator", None)
        if written_by != model.class_path:
            raise UserError(
                f"--ckpt_path {ckpt_path} was written by {written_by.rsplit('.', 1)[-1]}, but this run trains"
                f" {model.class_path.rsplit('.', 1)[-1]}; resume with the config that wrote the checkpoint"
            )
        if subcommand == "fit" and not self.config.fit.resume_with_changed_data:
            digest = ckpt.get(PreferenceDataModule.__qualname__, {}).get("dataset_digest")
            check_same_rows(ckpt_path, ckpt.get("datamodule_hyper_parameters", {}), self.config.fit.data.as_dict(), digest)
        check_same_model(ckpt_path, hparams, model.init_args.as_dict(), import_object(model.class_path).resume_applies)
        self.config[subcommand].ckpt_path = str(ckpt_path)
        folder = version_folder(Path(ckpt_path))
        if subcommand == "fit" and folder is not None and not (folder / "hf").exists():
            self.resume_folder = folder  # TensorBoard curves and checkpoints go on where they stopped

    @staticmethod
    def run_root(config) -> Path:
        """`<default_root_dir>/logs/<algorithm>`: where the default logger puts the version folders of a run
        configured by `config` (one subcommand's section)."""
        algorithm = import_object(config.model.class_path).algorithm
        return Path(config.trainer.default_root_dir or ".") / "logs" / algorithm

    def resolve_last(self, subcommand: str):
        """`--ckpt_path last`: the newest checkpoint of this algorithm's log folder; None (a new run) if it has none."""
        run_root = self.run_root(self.config[subcommand])
        newest = newest_checkpoint(run_root)
        if newest is None:
            rank_zero_info(f"--ckpt_path last: no checkpoint under {run_root.resolve()}; starting a new run")
            self.config[subcommand].ckpt_path = None
        return newest

    def before_instantiate_classes(self) -> None:
        """Checks that need no model: data flag ranges, and a training run that would take no step."""
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        PreferenceDataModule.check_flags(self.config[subcommand].data.as_dict())
        trainer = self.config[subcommand].trainer
        if subcommand == "fit":
            for flag in ("max_steps", "max_epochs", "limit_train_batches"):
                if trainer.get(flag) == 0:
                    raise UserError(f"--trainer.{flag} 0: the run would train no step and export an untrained model")

    def instantiate_trainer(self, **kwargs):
        """Log to `<default_root_dir>/logs/<algorithm>/version_N` unless a logger is configured (a resumed run
        goes on in its checkpoint's folder); checkpoints are written atomically and SIGTERM / Ctrl-C end
        the run with a checkpoint (lit_rlhf/runs.py); without `--trainer.precision`, train in the precision
        this machine runs fast (lit_rlhf/precision.py)."""
        trainer_config = self._get(self.config_init, "trainer", default={})
        if trainer_config.get("precision") is None:
            kwargs["precision"], reason = auto_precision()
            rank_zero_info(f"precision {kwargs['precision']}: {reason} (--trainer.precision overrides)")
        default_logger = trainer_config.get("logger") in (None, True)
        if default_logger:
            if self.resume_folder is not None:
                save_dir, name, version = self.resume_folder.parent.parent, self.resume_folder.parent.name, self.resume_folder.name
            else:
                save_dir, name, version = self.run_root(self.config[self.subcommand] if self.subcommand else self.config).parent.resolve(), self.model.algorithm, None
            kwargs["logger"] = RunLogger(str(save_dir), name=name, version=version)
        if not trainer_config.get("plugins"):
            kwargs["plugins"] = [AtomicCheckpointIO()]
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(StopCheckpoint())
        if default_logger and self.resume_folder is None:  # a fresh version folder of ours: safe to remove when the run fails at once
            trainer.callbacks.append(RemoveFailedRunDir())
        return trainer


def import_object(path: str):
    """The class or function a dotted `module.name` path names."""
    module, _, name = path.rpartition(".")
    return getattr(import_module(module), name)


def check_same_rows(ckpt_path, saved: dict, given: dict, dataset_digest: Optional[str] = None) -> None:
    """Refuse a resume whose data flags would train or validate other rows than the checkpoint's run. A local
    dataset at another path whose files hold the same bytes (`dataset_digest`, saved in the checkpoint) is the same data."""
    same = {k for k in ROW_FLAGS if saved.get(k) == given.get(k)}
    if "dataset" not in same and dataset_digest is not None and content_digest(given["dataset"]) == dataset_digest:
        rank_zero_info(f"resuming from {ckpt_path}: --data.dataset {given['dataset']} holds the same rows as the checkpoint's {saved.get('dataset')}")
        same.add("dataset")
    changed = [f"--data.{k} {given.get(k)!r} (checkpoint: {saved.get(k)!r})" for k in ROW_FLAGS if k in saved and k not in same]
    if changed:
        raise UserError(
            f"resuming from {ckpt_path} with other data flags than it was trained with: {', '.join(changed)}; they change"
            " which rows train and in which order. Resume with the checkpoint's values, or pass"
            " --resume_with_changed_data true if you mean it"
        )


def check_same_model(ckpt_path, saved: dict, given: dict, applies: tuple[str, ...]) -> None:
    """Compare the `--model.*` values of a resume (`given`) with the checkpoint's (`saved`): a changed flag the
    module `applies` on resume is named in a line; any other change refuses the resume, saying which flags to
    pass. A flag that runs or imports code (`trust_remote_code`, an import path `file.py:function`) is read
    from the command line only, so a checkpoint cannot switch it on: the refusal says so."""
    changed = {k: (given[k], saved[k]) for k in given if k in saved and given[k] != saved[k]}
    applied = [f"--model.{k} {new!r} (checkpoint: {old!r})" for k, (new, old) in changed.items() if k in applies]
    refused = {k: v for k, v in changed.items() if k not in applies}
    if refused:
        flags = ", ".join(f"--model.{k} {new!r} (checkpoint: {old!r})" for k, (new, old) in refused.items())
        code = [k for k, (_, old) in refused.items() if runs_code(k, old)]
        raise UserError(
            f"resuming from {ckpt_path} with other model flags than it was trained with: {flags}. A resume trains with"
            " its command line's flags and these cannot change mid-run: resume with the command that started the run"
            + (f"; a checkpoint never grants {', '.join(f'--model.{k}' for k in code)}: pass it on the command line if you trust it" if code else "")
            + f" (a resume may change: {', '.join(applies)})"
        )
    if applied:
        rank_zero_info(f"resuming from {ckpt_path} with changed flags, applied from here on: {', '.join(applied)}")


def runs_code(flag: str, value) -> bool:
    """True for a flag value that runs or imports code: `trust_remote_code` on, or an import path `module:function`."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return (flag == "trust_remote_code" and bool(value)) or any(isinstance(v, str) and ":" in v for v in values)


def config_error(err: ArgumentError, parsers: dict) -> str:
    """One line for what the config parser refused: an unknown key with the nearest valid one, else the
    parser's innermost message."""
    chain = [err]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None and cause not in chain:
        chain.append(cause)
    text = " ".join(" ".join(str(e).split()) for e in chain)
    option = re.search(r"Option '([\w.]+)' is not accepted", text)
    class_path = re.search(r"class_path '([\w.]+)'", text)
    if option and class_path:
        cls = import_object(class_path.group(1))
        names = {p for klass in cls.__mro__ if "__init__" in vars(klass) for p in inspect.signature(klass.__init__).parameters}
        return unknown_key(f"{cls.__name__} option", option.group(1), names - {"self", "args", "kwargs"})
    refused = re.search(r"Subcommand '(\w+)' does not accept option '([\w.]+)'", text)
    if refused:
        parser = parsers.get(refused.group(1), next(iter(parsers.values())))
        return unknown_key("key", refused.group(2), {action.dest for action in parser._actions})
    keyed = next((e for e in chain if str(e).startswith("Parser key")), chain[-1])  # names the flag
    return " ".join(str(keyed).split()) + " (--help lists every flag)"


def unknown_key(what: str, key: str, valid: set[str]) -> str:
    nearest = difflib.get_close_matches(key, sorted(valid), n=1)
    return f"unknown {what} '{key}'" + (f"; did you mean '{nearest[0]}'?" if nearest else "") + " (--help lists every flag)"


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
        parser_kwargs={"exit_on_error": False, **{name: {"exit_on_error": False} for name in ("fit", "validate", "test")}},
    )
