"""A run's folder and checkpoints on a cluster: claimed atomically, written atomically, resumed from the newest.

- `RunLogger` claims `logs/<algorithm>/version_N` with one `mkdir`, so two runs started together
  in one folder never share a version.
- `AtomicCheckpointIO` writes each checkpoint beside its target and renames it into place: a full
  disk or a kill mid-write leaves the earlier checkpoints and no truncated file.
- `RemoveFailedRunDir` gives back the version folder of a run that fails before its first step.
- `StopCheckpoint` turns SIGTERM (a scheduler's preemption) and a first Ctrl-C into a checkpoint at the
  end of the step in progress and a non-zero exit that names it; an exception after a step writes one too.
- `signals_deferred` holds SIGTERM and Ctrl-C back while a model is exported, so an export is never cut.
- `newest_checkpoint` is what `--ckpt_path last` means: the newest checkpoint of the run's log folder.
"""

import errno
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_rlhf.atomic import written_atomically
from lit_rlhf.errors import NonFiniteError, UserError


def os_error_text(err: OSError, action: str) -> str:
    """`ENOSPC: no space left on device while writing PATH`: the errno's name, its text, what was being done."""
    name = errno.errorcode.get(err.errno, "OSError")
    return f"{name}: {(err.strerror or str(err)).lower()} while {action}"


class RunLogger(TensorBoardLogger):
    """TensorBoard logs in `<save_dir>/<name>/version_N`; a new N is claimed by creating its folder (one
    atomic `mkdir` on the first process), so concurrent runs in one folder get distinct versions."""

    def _get_next_version(self) -> int:
        if rank_zero_only.rank != 0:  # the others read rank 0's folder through `trainer.log_dir`
            return super()._get_next_version()
        os.makedirs(self.root_dir, exist_ok=True)
        while True:
            version = super()._get_next_version()
            try:
                os.mkdir(os.path.join(self.root_dir, f"version_{version}"))
                return version
            except FileExistsError:  # another run claimed it between the listing and the mkdir
                continue


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` to a new file beside `path`, then an atomic rename onto it (`written_atomically`).

    An error while writing (ENOSPC, EDQUOT, a read-only folder) removes the partial file and stops the
    run with one line naming the errno, the checkpoint and that the earlier checkpoints are intact."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Optional[dict] = None) -> None:
        if "://" in str(path):  # remote storage: Lightning's own transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        try:
            with written_atomically(path) as partial, open(partial, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise UserError(
                f"{os_error_text(err, f'writing checkpoint {path}')}; nothing half-written was left, earlier"
                " checkpoints are intact"
            ) from err


class RemoveFailedRunDir(Callback):
    """A run that fails before its first optimizer step (bad data, bad weights, a NaN at step 0) removes
    the `logs/<algorithm>/version_N` folder it created, so it does not shift later version numbers."""

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        log_dir = Path(trainer.logger.log_dir)
        if trainer.global_step == 0 and trainer.is_global_zero and not any(log_dir.rglob("*.ckpt")):
            shutil.rmtree(log_dir, ignore_errors=True)


def newest_checkpoint(run_root: Path) -> Optional[Path]:
    """The most recently written `.ckpt` under `run_root` (`logs/<algorithm>`), or None."""
    found = [p for p in run_root.glob("version_*/checkpoints/*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns, default=None)


def version_folder(ckpt_path: Path) -> Optional[Path]:
    """The `.../version_N` folder a checkpoint at `.../version_N/checkpoints/x.ckpt` belongs to, else None."""
    folder = ckpt_path.resolve().parent.parent
    return folder if ckpt_path.resolve().parent.name == "checkpoints" and folder.name.startswith("version_") else None


class StopCheckpoint(Callback):
    """A run that stops early writes `checkpoints/last.ckpt` first, so it loses at most the step in progress.

    SIGTERM, or a first Ctrl-C, ends the run at the end of the step in progress. The signal handler only
    notes the signal. At the end of each training step every process asks whether any process was
    signalled (one all-reduce of a boolean, at the same point in all of them), and if so all mark the
    run as SIGTERMed, upon which Lightning raises `SIGTERMException` when the step is done. (Lightning's
    own SIGTERM handler broadcasts from inside the handler, at whatever collective the other processes
    are in, which breaks a multi-process run.) A second Ctrl-C stops at once, without a checkpoint.

    An exception raised after at least one optimizer step (a reward function's MemoryError, a NaN loss)
    writes the checkpoint too, at the end of the last step that finished: the data position is wound
    back to it, so the resume retrains the step that failed. In a multi-process run only an error that
    every process raises together (a non-finite value, decided by all of them) can be saved: saving is
    a collective, and one process cannot save alone.

    The checkpoint is the newest state and `--ckpt_path last` resumes it; the run exits 1 with one line
    that names it. A signal that arrives after the last step is saved the same way, and the run
    still exports its model (`AlignmentModule.on_fit_end`).
    """

    def __init__(self) -> None:
        self.requested: Optional[int] = None  # the signal that asked the run to stop
        self.training_ended = False

    def on_train_start(self, trainer, pl_module) -> None:
        """Replace the handlers Lightning registered when `fit` started (its teardown restores the originals)."""

        def stop_after_this_step(signum, frame):
            if signum == signal.SIGINT and self.requested == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = signum
            again = " (Ctrl-C again stops at once, without one)" if signum == signal.SIGINT else ""
            rank_zero_info(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint{again}")

        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, stop_after_this_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sampler = getattr(trainer.datamodule, "train_sampler", None)
        if sampler is not None:  # the step took its batch (one, or more with dynamic sampling) and trained
            sampler.batches_trained = sampler.batches_done
        if trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False):
            trainer._signal_connector.received_sigterm = True  # Lightning raises SIGTERMException once this step is done

    def on_train_end(self, trainer, pl_module) -> None:
        self.training_ended = True
        if self.requested is not None:  # the signal came during the last step: no SIGTERMException follows
            self.save_last(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            path = self.save_last(trainer)
            exception.code = (
                f"lit-rlhf: error: interrupted by {signal.Signals(self.requested or signal.SIGTERM).name} at step"
                f" {trainer.global_step}, epoch {trainer.current_epoch}: checkpoint written to {path}; resume with"
                f" --ckpt_path {path} (or --ckpt_path last)"
            )
        elif self.saves_on(trainer, exception):
            sampler, progress = getattr(trainer.datamodule, "train_sampler", None), trainer.fit_loop.epoch_loop.batch_progress.current
            if sampler is not None and progress.ready > progress.completed:
                # the step that failed took its batches (one, or more with dynamic sampling) but did not train: the
                # resume takes them again
                sampler.batches_done = sampler.batches_trained
            try:
                path = self.save_last(trainer)
            except UserError as err:  # a full disk: the original error stays the one reported
                exception.checkpoint_note = f"no checkpoint could be written ({err})"
                return
            exception.checkpoint_note = f"checkpoint of step {trainer.global_step} written to {path}; resume with --ckpt_path last"

    def saves_on(self, trainer, exception: BaseException) -> bool:
        """Whether `exception` gets a failure checkpoint: raised in `fit` after an optimizer step and before the
        training ended, not a second Ctrl-C, and (several processes) raised by all of them together."""
        return (
            trainer.state.fn == "fit"
            and not self.training_ended
            and trainer.global_step > 0
            and not isinstance(exception, KeyboardInterrupt)
            and (trainer.world_size == 1 or isinstance(exception, NonFiniteError))
        )

    @staticmethod
    def save_last(trainer) -> Path:
        """Write `checkpoints/last.ckpt` (every process calls it) and make it the one `ModelCheckpoint` updates
        from now on, also after a resume (else a resumed run writes `last-v1.ckpt` beside it)."""
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None and checkpoint.dirpath:
            path = Path(checkpoint.format_checkpoint_name({}, ModelCheckpoint.CHECKPOINT_NAME_LAST))
            checkpoint.last_model_path = str(path)
        else:
            path = Path(trainer.log_dir) / "checkpoints" / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
        trainer.save_checkpoint(path, weights_only=False)  # the whole state: optimizer, loops, callbacks
        return path.resolve()


@contextmanager
def signals_deferred() -> Iterator[list[int]]:
    """SIGTERM and a first Ctrl-C are noted, not acted on, inside the block: the block (an export) finishes,
    then the caller reads the list of signals received. A second Ctrl-C stops at once. Outside the main
    thread (where no handler can be set) the block runs as it is."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def note(signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in received:
            raise KeyboardInterrupt
        received.append(signum)
        rank_zero_info(f"\n{signal.Signals(signum).name}: finishing the export first")

    previous = {signum: signal.signal(signum, note) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
