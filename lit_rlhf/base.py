"""What the three trainers share: the policy/reward source, LoRA flags, optimizer, export."""

import shutil
import signal
from functools import partial
from pathlib import Path
from typing import Literal, Union

import lightning as L
import torch
import yaml
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.distributed.tensor import DTensor
from torchmetrics import MeanMetric
from transformers import PreTrainedModel

from lit_rlhf.distributed import data_parallel_mesh, fsdp2, fully_shard_models, gathered_state_dict, sum_over_processes
from lit_rlhf.errors import NonFiniteError, UserError, check_ranges
from lit_rlhf.loader import CountingDataLoader
from lit_rlhf.models import export_pretrained, load_policy, unwrap
from lit_rlhf.ops import linear_warmup_constant, linear_warmup_decay
from lit_rlhf.runs import StopCheckpoint, signals_deferred, version_folder

DEFAULT_MODEL = "HuggingFaceTB/SmolLM-135M-Instruct"


class AlignmentModule(L.LightningModule):
    """Base class: subclasses set `algorithm`, build `self.model` and `self.tokenizer`."""

    algorithm: str
    #: metrics shown in the progress bar
    progress_bar_metrics: tuple[str, ...] = ("loss",)
    #: submodules reloaded from their source on resume instead of being written into checkpoints
    frozen_modules: tuple[str, ...] = ()
    #: submodules the optimizer trains (gradient checkpointing applies to these)
    trained_modules: tuple[str, ...] = ("model",)
    #: `__init__` arguments a resume may change (applied from the resumed step on); a resume that changes any
    #: other is refused (`cli.check_same_model`): they decide the models loaded, the data, or code that runs
    resume_applies: tuple[str, ...] = ("learning_rate", "on_non_finite", "gradient_checkpointing", "attn_implementation")
    #: numeric `__init__` arguments and their ranges, checked before any model is loaded (subclasses extend it)
    flag_ranges = {"learning_rate": "> 0", "weight_decay": ">= 0", "warmup_steps": ">= 0", "lora_r": ">= 0",
                   "lora_alpha": "> 0", "lora_dropout": "in [0, 1)"}  # fmt: skip

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_scheduler: Literal["linear", "constant"] = "linear",
        lora_r: int = 0,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        lora_target_modules: Union[str, list[str]] = "all-linear",
        gradient_checkpointing: bool = False,
        on_non_finite: Literal["stop", "skip"] = "stop",
        trust_remote_code: bool = False,
        attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa",
    ):
        """
        Args:
            model_name_or_path: Hub id, local Hugging Face folder, or .gguf file of the model to
                train; also the tokenizer the DataModule uses.
            learning_rate: Peak AdamW learning rate.
            weight_decay: AdamW weight decay.
            warmup_steps: Scheduler steps of linear warmup (optimizer steps; PPO: PPO steps).
            lr_scheduler: The rate after the warmup: `linear` decays it linearly to 0 at the run's last
                step (transformers' `linear`), `constant` keeps it at `learning_rate` (`constant_with_warmup`).
            lora_r: LoRA rank; 0 trains all weights.
            lora_alpha: LoRA scaling numerator (scale = alpha / r).
            lora_dropout: Dropout on the LoRA input.
            lora_target_modules: Module names that get adapters, or "all-linear".
            gradient_checkpointing: Recompute each layer's activations in the backward pass instead of
                keeping them: less memory for about one more forward pass of compute.
            on_non_finite: What a NaN or infinite loss, gradient, score or advantage does. `stop`: the run
                ends with one line naming the step and batch; checkpoints written so far are kept and
                nothing is exported. `skip`: that update is skipped and counted in `non_finite_skips`.
            trust_remote_code: Run model code shipped with the checkpoint (off unless you trust it).
            attn_implementation: Attention kernel of every model the run loads (policy, reference, reward
                and value models): `sdpa` (torch's scaled_dot_product_attention), `eager` (plain matmuls),
                `flash_attention_2` (needs a GPU and `pip install flash-attn`).
        """
        super().__init__()
        self.save_hyperparameters()  # collects the subclass's arguments too
        check_ranges("model", self.hparams, self.flag_ranges)
        self.strict_loading = False  # checkpoints leave out `frozen_modules`
        self.val_metrics = nn.ModuleDict()  # filled by log_stats
        self.non_finite_skips = 0
        self.start_step = 0  # the global step this fit starts from (a checkpoint's)
        self.skip_update = False  # set by a non-finite training loss: the next optimizer step is dropped

    def shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        """Loss of a batch; logs its statistics with `log_stats`."""
        raise NotImplementedError

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        loss = self.shared_step(batch, "train")
        if not self.finite_in_every_process(loss):
            self.non_finite(f"loss ({loss.item()})")
            return self.no_update_loss()
        return loss

    def no_update_loss(self) -> torch.Tensor:
        """A loss whose gradient is 0 for every trained weight, and the optimizer step that follows is dropped
        (`on_before_optimizer_step`). Not None: Lightning refuses a skipped `training_step` in a
        multi-process run, whose processes must all run the backward pass (it syncs the gradients)."""
        self.skip_update = True
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

    def finite_in_every_process(self, tensor: torch.Tensor) -> bool:
        """True if `tensor` is finite in every process of the run (one all-reduce when there are several),
        so that all processes stop or skip together: a process that skips a backward pass the others
        run would leave them waiting for its gradients."""
        return self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(tensor).all()), all=True)

    def sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the processes of the run (one all-reduce); `tensor` itself outside a run."""
        return sum_over_processes(self._trainer, tensor)

    def non_finite(self, what: str) -> None:
        """Stop the run on a non-finite `what`, or with `on_non_finite=skip` count the skipped update."""
        where = f"at step {self.global_step} (epoch {self.current_epoch}, batch {self.trainer.fit_loop.epoch_loop.batch_idx})"
        if self.hparams.on_non_finite == "stop":
            raise NonFiniteError(
                f"non-finite {what} {where}; the run stopped: checkpoints written so far are kept and nothing was"
                " exported (--model.on_non_finite skip skips such updates instead)"
            )
        self.non_finite_skips += 1
        rank_zero_warn(f"non-finite {what} {where}: update skipped ({self.non_finite_skips} so far)")
        self.log("non_finite_skips", float(self.non_finite_skips))

    def gradients_are_finite(self, optimizer) -> bool:
        """True if every gradient `optimizer` holds is finite; otherwise `non_finite` and the gradients are
        dropped, so the step that follows leaves the weights (and AdamW's moments) untouched."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if all(torch.isfinite(g).all() for g in grads):
            return True
        self.non_finite("gradient")
        optimizer.zero_grad(set_to_none=True)
        return False

    def gradient_norms(self) -> dict[str, torch.Tensor]:
        """The norm of each trained module's gradients as they are now (before clipping), `grad_norm/<module>`; none
        for a module whose gradients the strategy keeps elsewhere (DeepSpeed)."""
        norms = {}
        for name in self.trained_modules:
            grads = [p.grad for p in getattr(self, name).parameters() if p.grad is not None]
            if grads:
                norm = torch.nn.utils.get_total_norm(grads)
                norms[f"grad_norm/{name}"] = norm.full_tensor() if isinstance(norm, DTensor) else norm
        return norms

    def clipped_step(self, optimizer, max_grad_norm: float) -> dict[str, torch.Tensor]:
        """An optimizer step by hand (manual optimisation), the gradients clipped to norm `max_grad_norm`; none when a
        gradient is not finite (`gradients_are_finite`). -> the gradient norms before clipping (`gradient_norms`)"""
        norms = self.gradient_norms()
        if self.gradients_are_finite(optimizer):
            self.clip_gradients(optimizer, gradient_clip_val=max_grad_norm, gradient_clip_algorithm="norm")
            optimizer.step()
        return norms

    def on_before_optimizer_step(self, optimizer) -> None:
        if not self.automatic_optimization:
            return
        if self.skip_update:  # without gradients AdamW leaves weights and moments untouched
            optimizer.zero_grad(set_to_none=True)
            self.skip_update = False
        else:
            self.gradients_are_finite(optimizer)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.shared_step(batch, "val")

    def log_stats(self, stats: dict[str, torch.Tensor], stage: str, batch_size: int) -> None:
        """Log `stats` under their own names in training, averaged over the processes of a multi-process
        run; in validation as `val_<name>`, averaged over the epoch (and the processes) by torchmetrics."""
        if stage == "train":
            for name, value in stats.items():
                self.log(name, value, batch_size=batch_size, prog_bar=name in self.progress_bar_metrics, sync_dist=True)
            return
        for name, value in stats.items():
            key = f"val_{name}"
            if key not in self.val_metrics:
                self.val_metrics[key] = MeanMetric().to(self.device)
            self.val_metrics[key].update(value, weight=batch_size)
            self.log(
                key,
                self.val_metrics[key],
                batch_size=batch_size,
                prog_bar=name in self.progress_bar_metrics,
                metric_attribute=f"val_metrics.{key}",
            )

    def lora_args(self) -> dict:
        hp = self.hparams
        return dict(r=hp.lora_r, alpha=hp.lora_alpha, dropout=hp.lora_dropout, target_modules=hp.lora_target_modules)

    def load_args(self) -> dict:
        """How every model of the run is loaded (`lit_rlhf.models`' loaders)."""
        return {"trust_remote_code": self.hparams.trust_remote_code, "attn_implementation": self.hparams.attn_implementation}

    def load_trained_model(self) -> nn.Module:
        """The model this run trains (`self.model`) as it starts: the policy, with its LoRA adapter if any."""
        return load_policy(self.hparams.model_name_or_path, self.lora_args(), **self.load_args())

    def configure_model(self) -> None:
        """Under `ModelParallelStrategy` (configs/strategies/fsdp2.yaml), shard every model of the run with
        FSDP2 over the processes (`distributed.fully_shard_models`); other strategies leave the models whole."""
        if fsdp2(self._trainer):
            models = [m for m in self.children() if isinstance(unwrap(m), PreTrainedModel)]
            fully_shard_models(models, data_parallel_mesh(self.trainer.strategy))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = {"linear": linear_warmup_decay, "constant": linear_warmup_constant}[self.hparams.lr_scheduler]
        schedule = partial(schedule, warmup_steps=self.hparams.warmup_steps, total_steps=total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        prefixes = tuple(f"{name}." for name in self.frozen_modules)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(prefixes)}
        checkpoint["torch_rng_state"] = torch.get_rng_state()  # PPO sampling and shuffling continue where they stopped
        sampler = getattr(self.trainer.datamodule, "train_sampler", None)
        epoch = checkpoint["loops"]["fit_loop"]["epoch_progress"]
        if sampler is not None and epoch["current"]["processed"] > epoch["current"]["completed"] and sampler.batches_done < len(sampler):
            # `max_steps` ended the epoch early: Lightning marks it processed, which would make a resume skip its
            # remaining batches; marked as in progress, the resume continues it row for row
            for counts in (epoch["current"], epoch["total"]):
                counts["processed"] = counts["completed"]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.start_step = checkpoint["global_step"]  # a resumed fit that takes no step from here exports nothing
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])

    def on_train_start(self) -> None:
        """A resume with another `--model.learning_rate`: the restored schedule goes on with it as its peak rate."""
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if any(base != self.hparams.learning_rate for base in scheduler.base_lrs):
                scheduler.base_lrs = [self.hparams.learning_rate] * len(scheduler.base_lrs)
                for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
                    group["lr"] = self.hparams.learning_rate * factor(scheduler.last_epoch)
                scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

    def on_train_epoch_start(self) -> None:
        """The batches a step takes beyond its own (`CountingDataLoader.next_batch`: PPO's dynamic sampling) count
        against the epoch's `--trainer.limit_train_batches`: the epoch ends after fewer steps."""
        if isinstance(loader := self.trainer.train_dataloader, CountingDataLoader):
            loader.limit = self.trainer.num_training_batches

    def on_fit_start(self) -> None:
        rank_zero_info(f"logs and checkpoints: {Path(self.trainer.log_dir).resolve()}")
        if self.hparams.gradient_checkpointing:
            for name in self.trained_modules:
                module = getattr(self, name)
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                module.train()  # transformers checkpoints in train mode only; dropout is 0, outputs are unchanged

    def on_fit_end(self) -> None:
        """Export the trained model to `<log_dir>/hf` on rank 0, with SIGTERM and Ctrl-C held until it is written
        (then the run exits 1 naming the export). A fit that took no optimizer step exports nothing and fails,
        unless it resumed the last checkpoint of its own run that had finished but not been exported (a kill
        during the export): that run's model is exported now. Every rank reads `trainer.log_dir`: in a
        multi-process run it is a broadcast from rank 0, which hangs if rank 0 calls it alone."""
        path = (Path(self.trainer.log_dir) / "hf").resolve()
        if self.global_step == self.start_step and not self.finished_unexported(path):
            raise UserError(
                f"this run took no optimizer step (global step {self.global_step}, epoch {self.current_epoch}), so"
                " nothing was exported: a resumed checkpoint that had finished its --trainer.max_epochs /"
                " max_steps and was exported already, or no training batch (--trainer.limit_train_batches, too few rows)"
            )
        model = self.model
        if fsdp2(self.trainer):  # the shards gathered into a whole copy in process 0
            state, model = gathered_state_dict(self.model), None
            if self.trainer.is_global_zero:
                model = self.load_trained_model()
                model.load_state_dict(state)
        stop = next((cb.requested for cb in self.trainer.callbacks if isinstance(cb, StopCheckpoint) and cb.requested), None)
        with signals_deferred() as received:
            if self.trainer.is_global_zero:
                for leftover in path.parent.glob(f".{path.name}.*.partial"):  # left by an export that was killed
                    rank_zero_info(f"removing {leftover}, left by an export that was killed")
                    shutil.rmtree(leftover, ignore_errors=True)
                export_pretrained(model, self.tokenizer, path, readme=self.model_card(path))
                rank_zero_info(f"exported {self.algorithm} model: {path}")
        signum = stop or next(iter(received), None)
        if signum is not None:
            raise UserError(f"interrupted by {signal.Signals(signum).name} at the end of training: the export was finished first: {path}")

    def finished_unexported(self, export: Path) -> bool:
        """True if this fit resumed a checkpoint of its own version folder (`export`'s parent) that has no export."""
        ckpt_path = self.trainer.ckpt_path
        return self.start_step > 0 and ckpt_path is not None and version_folder(Path(ckpt_path)) == export.parent and not export.exists()

    def model_card(self, path: Path) -> str:
        """README.md of the exported folder `path`: source, data, hyperparameters, final metrics, loading snippet."""
        dm = self.trainer.datamodule
        data = {k: v for k, v in (dm.hparams if dm is not None else {}).items() if not k.startswith("_")}
        metrics = {k: round(v.item(), 4) for k, v in sorted(self.trainer.callback_metrics.items()) if v.numel() == 1}
        hparams = {k: v for k, v in self.hparams.items() if not k.startswith("_")}
        loader = "AutoModelForSequenceClassification" if self.algorithm == "reward" else "AutoModelForCausalLM"
        return "\n".join([
            f"# {self.algorithm} model trained with lit-rlhf", "",
            f"- base model: `{self.hparams.model_name_or_path}`",
            f"- data: `{data.get('dataset')}` ({len(dm.train_rows) if dm else '?'} training rows)",
            f"- algorithm: `{type(self).__name__}`, {self.trainer.global_step} optimizer steps", "",
            "## Hyperparameters", "", "```yaml", yaml.safe_dump({"model": hparams, "data": data}, sort_keys=False).strip(), "```", "",
            "## Metrics at the end of training", "", *[f"- `{k}`: {v}" for k, v in metrics.items()], "",
            "## Load", "", "```python", f"from transformers import AutoTokenizer, {loader}", "",
            f'model = {loader}.from_pretrained("{path}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{path}")', "```", "",
        ])  # fmt: skip
