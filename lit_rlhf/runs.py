"""A run's folder and checkpoints on a cluster: claimed atomically, written atomically, resumed from the newest.

- `RunLogger` claims `logs/<algorithm>/version_N` with one `mkdir`, so two runs started together
  in one folder never share a version.
- `AtomicCheckpointIO` writes each checkpoint beside its target and renames it into place: a full
  disk or a kill mid-write leaves the earlier checkpoints and no truncated file.
- `RemoveFailedRunDir` gives back the version folder of a run that fails before its first step.
- `Preemption` turns SIGTERM (a scheduler's preemption) and a first Ctrl-C into a checkpoint at the
  end of the step in progress and a non-zero exit that names it.
- `newest_checkpoint` is what `--ckpt_path last` means: the newest checkpoint of the run's log folder.
"""

import errno
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Optional

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_rlhf.atomic import written_atomically
from lit_rlhf.errors import UserError


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


class Preemption(Callback):
    """SIGTERM, or a first Ctrl-C, ends the run at the end of the step in progress with a checkpoint.

    The signal handler only notes the signal. At the end of each training step every process asks
    whether any process was signalled (one all-reduce of a boolean, at the same point in all of them),
    and if so all mark the run as SIGTERMed, upon which Lightning raises `SIGTERMException` when the
    step is done. (Lightning's own SIGTERM handler broadcasts from inside the handler, at whatever
    collective the other processes are in, which breaks a multi-process run.) On that exception
    every process writes `checkpoints/last.ckpt` (the newest state: `--ckpt_path last` resumes it) and
    the run exits 1 with one line that names the checkpoint. A second Ctrl-C stops at once, without one.
    """

    def __init__(self) -> None:
        self.requested: Optional[int] = None  # the signal that asked the run to stop

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
        if trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False):
            trainer._signal_connector.received_sigterm = True  # Lightning raises SIGTERMException once this step is done

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        checkpoint = trainer.checkpoint_callback
        folder = Path(checkpoint.dirpath) if checkpoint and checkpoint.dirpath else Path(trainer.log_dir) / "checkpoints"
        path = (folder / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}").resolve()
        trainer.save_checkpoint(path)
        exception.code = (
            f"lit-rlhf: error: interrupted by {signal.Signals(self.requested or signal.SIGTERM).name} at step"
            f" {trainer.global_step}, epoch {trainer.current_epoch}: checkpoint written to {path}; resume with"
            f" --ckpt_path {path} (or --ckpt_path last)"
        )
