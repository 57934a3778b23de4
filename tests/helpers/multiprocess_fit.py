"""Fit runs one after the other in the same processes and save what each process saw: the helper of
tests/test_multiprocess.py and tests/test_fsdp2.py.

    python tests/helpers/multiprocess_fit.py RUNS.json

reads a list of runs, `{"name", "out_dir", "args", "nan_step", "env"}`; for each, in its `out_dir` with its
`env` and a datasets cache of its own (`out_dir/cache`), it builds the run with `lit_rlhf.cli.cli(args,
run=False)`, fits it and saves `out_dir/<name>.rank<r>.pt` in every process r, with the work each process did:
exports, rows tokenized, rows whose DPO reference log-probs it computed. `nan_step` >= 0 turns process 1's
training loss at that global step into NaN.

Lightning's launcher starts processes 1.. by running this script again with the same arguments, at the first
run's `fit` (so the script's work sits under `if __name__ == "__main__"`); it then leaves `LOCAL_RANK` set in
process 0, so the later runs join the processes and the process group already there: one start-up for all.
"""

import json
import os
import sys
from pathlib import Path

import datasets.config
import torch
from lightning.pytorch.callbacks import Callback
from torch.distributed.tensor import DTensor

import lit_rlhf.base
import lit_rlhf.tokenization
from lit_rlhf.cli import cli
from lit_rlhf.dpo import DPOModule


class Recorder(Callback):
    """What one process sees: row indices of its batches, logged metrics and trained weights after
    each training batch, PPO's whitened advantages, weights and torch RNG state when training starts, DPO's
    precomputed reference log-probs."""

    def __init__(self):
        self.record = {"train_rows": [], "val_rows": [], "metrics": [], "weights": [], "advantages": []}

    @staticmethod
    def trained_weights(module) -> dict[str, torch.Tensor]:
        """Whole tensors: an FSDP2 shard is gathered (a collective: every process records at the same points)."""
        return {k: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for k, p in module.named_parameters() if p.requires_grad}

    def on_train_start(self, trainer, module) -> None:
        trained = [p for p in module.parameters() if p.requires_grad]
        local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in trained)
        self.record |= {"rng_state": torch.get_rng_state(), "initial_weights": self.trained_weights(module),
                        "local_share": local / sum(p.numel() for p in trained)}  # fmt: skip
        if hasattr(module, "compute_advantages"):  # PPO
            compute_advantages = module.compute_advantages

            def recorded(rollout):
                rollout = compute_advantages(rollout)
                self.record["advantages"].append((rollout.advantages, rollout.response_mask))
                return rollout

            module.compute_advantages = recorded

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.record["train_rows"].append(batch["index"].tolist())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.record["metrics"].append({k: v.item() for k, v in trainer.callback_metrics.items() if v.numel() == 1})
        self.record["weights"].append(self.trained_weights(module))

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self.record["val_rows"].append(batch["index"].tolist())

    def on_fit_end(self, trainer, module) -> None:
        self.record |= {
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "strategy": type(trainer.strategy).__name__,
            "final_metrics": {k: v.item() for k, v in trainer.callback_metrics.items() if v.numel() == 1},
            "non_finite_skips": module.non_finite_skips,
            "ref_logps": getattr(module, "ref_logps_cache", None),
            "frozen_requires_grad": {
                name: any(p.requires_grad for p in getattr(module, name).parameters())
                for name in module.frozen_modules
                if getattr(module, name) is not None
            },
        }


def poison(module, step: int) -> None:
    """Process 1's training loss at global step `step` becomes NaN (after its statistics are logged)."""
    shared_step = module.shared_step

    def poisoned(batch, stage):
        loss = shared_step(batch, stage)
        return loss * float("nan") if stage == "train" and module.global_rank == 1 and module.global_step == step else loss

    module.shared_step = poisoned


def fit_and_record(args: list[str], nan_step: int = -1) -> dict:
    """Fit `lit-rlhf fit ARGS` in this process (`--ckpt_path FILE` resumes FILE); the record of what it saw (its
    rank is `trainer.global_rank`)."""
    ckpt_path = None
    if "--ckpt_path" in args:
        at = args.index("--ckpt_path")
        ckpt_path, args = args[at + 1], args[:at] + args[at + 2 :]
    run = cli(args, run=False)
    recorder = Recorder()
    run.trainer.callbacks.append(recorder)
    if nan_step >= 0:
        poison(run.model, nan_step)
    run.trainer.fit(run.model, datamodule=run.datamodule, ckpt_path=ckpt_path)
    return recorder.record | {"rank": run.trainer.global_rank}


def record_calls(record: dict, key: str, owner, name: str, entry=lambda *args: True) -> None:
    """From now on every call of `owner.<name>` in this process appends `entry(*args)` to `record[key]`."""
    record[key] = []
    original = getattr(owner, name)

    def recorded(*args, **kwargs):
        record[key].append(entry(*args))
        return original(*args, **kwargs)

    setattr(owner, name, recorded)


if __name__ == "__main__":
    work = {}
    record_calls(work, "exported", lit_rlhf.base, "export_pretrained")
    record_calls(work, "tokenized_rows", lit_rlhf.tokenization, "encode_messages")
    record_calls(work, "reference_rows", DPOModule, "live_reference_logps", lambda module, batch: batch["index"].tolist())
    for run in json.loads(Path(sys.argv[1]).read_text()):
        out_dir = Path(run["out_dir"])
        out_dir.mkdir(parents=True, exist_ok=True)
        os.chdir(out_dir)
        before = {key: os.environ.get(key) for key in run["env"]}
        os.environ.update(run["env"], HF_DATASETS_CACHE=str(out_dir / "cache"))
        datasets.config.HF_DATASETS_CACHE = out_dir / "cache"  # its rank 0 tokenizes, its rank 1 reads what rank 0 wrote
        for calls in work.values():
            calls.clear()
        record = fit_and_record(run["args"], run["nan_step"]) | {key: list(calls) for key, calls in work.items()}
        torch.save(record, out_dir / f"{run['name']}.rank{record['rank']}.pt")
        for key, value in before.items():  # the run's own variables undone (not the launcher's: later runs join its processes)
            os.environ.pop(key) if value is None else os.environ.update({key: value})
