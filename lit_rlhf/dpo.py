"""DPO (Rafailov et al. 2023) and the preference losses of its family: the policy learns from (chosen,
rejected) pairs, against a frozen reference when the loss reads one (`losses.PREFERENCE_LOSSES`)."""

import hashlib
import inspect
from pathlib import Path
from typing import Optional

import torch
from torch.distributed.tensor import DTensor
from lightning.pytorch.utilities import rank_zero_info

from lit_rlhf.base import DEFAULT_MODEL, AlignmentModule
from lit_rlhf.atomic import written_atomically
from lit_rlhf.tokenization import cache_dir
from lit_rlhf.forward import sequence_logps
from lit_rlhf.errors import UserError
from lit_rlhf.losses import LOSS_FLAGS, PREFERENCE_LOSS_ARGUMENTS, PREFERENCE_LOSSES, UNPAIRED_LOSS_ARGUMENTS, PreferenceLoss, rpo_nll_loss
from lit_rlhf.models import as_reference, load_causal_lm, load_tokenizer
from lit_rlhf.ops import IGNORE_INDEX
from lit_rlhf.plugins import check_shape, declared_arguments, hyperparameter_text, resolve, with_hyperparameters

LOSS_CONTRACT = (
    "a preference loss is called with any of the keyword arguments " + ", ".join(PREFERENCE_LOSS_ARGUMENTS)
    + " that it declares and returns the (B,) per-pair losses; one that declares `labels` reads unpaired rows and gets"
    " any of " + ", ".join(UNPAIRED_LOSS_ARGUMENTS) + " (lit_rlhf/losses.py)"
)


class DPOModule(AlignmentModule):
    algorithm = "dpo"
    progress_bar_metrics = ("loss", "rewards/accuracies")
    frozen_modules = ("ref_model",)
    resume_applies = AlignmentModule.resume_applies + ("beta", "rpo_alpha", "loss_args", *LOSS_FLAGS)
    flag_ranges = AlignmentModule.flag_ranges | {"beta": "> 0", "rpo_alpha": ">= 0"} | {name: flag.range for name, flag in LOSS_FLAGS.items()}

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        learning_rate: float = 1e-6,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        # the flags of the losses' records (losses.LOSS_FLAGS): type and default here, range and help in the record
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        rdpo_alpha: float = 0.01,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        loss_args: Optional[dict] = None,
        ref_model_name_or_path: Optional[str] = None,
        precompute_ref_logps: bool = False,
        rpo_alpha: Optional[float] = None,
        gradient_checkpointing: bool = True,
        **kwargs,
    ):
        """Direct Preference Optimization.

        Args:
            model_name_or_path: Hub id, local folder or .gguf file of the policy to train.
            learning_rate: Peak AdamW learning rate (DPO work uses 5e-7 to 5e-6; TRL's default is 1e-6).
            beta: Strength of the implicit KL penalty to the reference.
            loss_type: The preference loss: LOSS_TYPES; or `module:function` / `file.py:function`, a
                function of your own with the same contract (lit_rlhf/losses.py). A loss that reads no
                reference log-probs loads no reference model.
            LOSS_FLAG_DOCS
            loss_args: Values of the loss's hyperparameters, its keyword arguments with a default outside
                the contract (a loss of your own, or one added to the table), e.g. `{alpha: 0.5}`.
            ref_model_name_or_path: Reference model (e.g. an SFT checkpoint). Default: a frozen copy of
                the starting policy; with LoRA, the policy with its adapter disabled (no second copy).
            precompute_ref_logps: Compute the reference log-probs of every row once before training (each
                process its share of the rows), then free the reference model. The table is cached on disk
                (in `HF_DATASETS_CACHE`, under `lit_rlhf/ref_logps`), keyed by the reference's weights,
                the tokenized rows and the precision: a later run with the same ones reads it.
            rpo_alpha: Weight of the per-token NLL of the chosen answers added to the loss (RPO, Pang et
                al. 2024; TRL's `rpo_alpha`): keeps the likelihood of preferred answers from falling,
                which guards against degenerate, repetitive text. Off if null; 1.0 in the RPO paper.
            gradient_checkpointing: On by default for DPO: at the recipe's batch 4 and max length 512 it
                cuts peak memory by about a quarter for a few percent of speed (docs/speed.md).
        """
        super().__init__(model_name_or_path=model_name_or_path, learning_rate=learning_rate,
                         gradient_checkpointing=gradient_checkpointing, **kwargs)  # fmt: skip
        hp = self.hparams
        entry = resolve(loss_type, PREFERENCE_LOSSES, "--model.loss_type")
        self.preference_loss = entry.function if isinstance(entry, PreferenceLoss) else entry
        if not callable(self.preference_loss):
            raise UserError(f"--model.loss_type {loss_type}: not a function")
        self.unpaired = "labels" in inspect.signature(self.preference_loss).parameters
        provided = UNPAIRED_LOSS_ARGUMENTS if self.unpaired else PREFERENCE_LOSS_ARGUMENTS
        self.loss_arguments = declared_arguments(self.preference_loss, provided, "--model.loss_type", LOSS_CONTRACT)
        self.preference_loss = with_hyperparameters(self.preference_loss, provided, loss_args, "--model.loss_args")
        self.needs_reference = any(name.startswith("ref_") for name in self.loss_arguments)
        if precompute_ref_logps and (self.unpaired or not self.needs_reference):
            raise UserError(f"--model.precompute_ref_logps: --model.loss_type {loss_type} reads no precomputable reference log-probs"
                            " (none, or those of mismatched rows that depend on the batch)")
        self.tokenizer = load_tokenizer(model_name_or_path, hp.trust_remote_code)
        self.model = self.load_trained_model()
        self.ref_model = None
        if self.needs_reference and (hp.ref_model_name_or_path or not hp.lora_r):
            self.ref_model = load_causal_lm(hp.ref_model_name_or_path or model_name_or_path, **self.load_args())
            self.ref_model.eval().requires_grad_(False)

    def setup(self, stage: str) -> None:
        """With `precompute_ref_logps`, make room for each row's reference log-probs: an (N, 2) buffer
        (chosen, rejected) indexed by the rows' `index`, NaN until computed, saved in checkpoints."""
        dm = self.trainer.datamodule
        mode = "unpaired" if self.unpaired else "pairs"
        if dm is not None and dm.hparams.mode != mode:
            raise UserError(f"--model.loss_type {self.hparams.loss_type} reads {mode} rows: set --data.mode {mode}"
                            + (" (--data.split_pairs true reads preference pairs as unpaired rows)" if self.unpaired else ""))
        if self.hparams.precompute_ref_logps and dm is not None and not hasattr(self, "ref_logps_cache"):
            self.register_buffer("ref_logps_cache", torch.full((dm.num_rows, 2), float("nan"), device=self.device))

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2B,) log-probs under the reference: precomputed (by row `index`) or computed now."""
        if hasattr(self, "ref_logps_cache"):
            return self.ref_logps_cache[batch["index"]].T.flatten()  # (B, 2) -> [chosen; rejected]
        return self.live_reference_logps(batch)

    @torch.no_grad()
    def live_reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(2B,) log-probs under the frozen reference copy, or under the policy with its adapter disabled."""
        with as_reference(self.model, self.ref_model) as reference:
            return sequence_logps(reference, batch)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.on_validation_start()

    def on_validation_start(self) -> None:
        if hasattr(self, "ref_logps_cache"):
            self.precompute_reference()

    def precompute_reference(self) -> None:
        """Fill `ref_logps_cache`, then free the reference model. A table restored from a checkpoint is
        complete: nothing is done. Otherwise it is read from the disk cache (`reference_cache_file`) if a
        run with the same reference and rows wrote it there; else each process computes its share of
        the rows, the shares are summed over processes (each row is 0 on every process but its own), and
        rank 0 writes the cache. Rank 0 decides, so that all processes load or all compute."""
        if self.ref_logps_cache.isnan().any():
            path = self.reference_cache_file()  # in every process: a sharded (FSDP2) weight is gathered to be hashed
            cached = self.trainer.is_global_zero and path.is_file()
            table = self.trainer.strategy.broadcast(torch.load(path, weights_only=True) if cached else None)
            if table is not None:
                rank_zero_info(f"reference log-probs of {len(table)} rows read from {path}; reference model freed")
            else:
                loader = self.trainer.datamodule.every_row_dataloader(self.global_rank, self.trainer.world_size)
                with self.trainer.precision_plugin.forward_context():  # as the policy's log-probs will be computed
                    share = self.reference_share(loader)
                table = self.trainer.strategy.reduce(share, reduce_op="sum")
                if self.trainer.is_global_zero:
                    with written_atomically(path) as partial:  # runs sharing the cache never read half a table
                        torch.save(table.cpu(), partial)
                rank_zero_info(f"precomputed reference log-probs of {len(table)} rows, cached in {path}; reference model freed")
            self.ref_logps_cache.copy_(table)
        self.ref_model = None

    def reference_share(self, loader) -> torch.Tensor:
        """(N, 2) reference log-probs (chosen, rejected) of the rows `loader` serves (pairs batches with
        `index`) at their `index`; 0 in every other row."""
        share = torch.zeros_like(self.ref_logps_cache)
        for batch in loader:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            share[batch["index"]] = self.live_reference_logps(batch).view(2, -1).T  # (B, 2)
        return share

    def reference_cache_file(self) -> Path:
        """`cache_dir("ref_logps")/<key>.pt`, the key hashing what the table depends on: the reference's
        weights and config (the policy's with its adapter disabled under LoRA), the tokenized rows
        (`PreferenceDataModule.fingerprint`: data, tokenizer, mode and length settings) and the precision."""
        reference = self.ref_model if self.ref_model is not None else self.model
        key = hashlib.blake2b(digest_size=16)
        for name, weight in reference.named_parameters():
            if "lora_" not in name:
                weight = weight.full_tensor() if isinstance(weight, DTensor) else weight  # FSDP2: the whole weight, not this shard
                key.update(f"{name} {weight.dtype} {tuple(weight.shape)}".encode())
                key.update(weight.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        key.update(f"{reference.config.to_json_string()} {self.trainer.datamodule.fingerprint} {self.trainer.precision}".encode())
        return cache_dir("ref_logps") / f"{key.hexdigest()}.pt"

    def shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        return self.unpaired_step(batch, stage) if self.unpaired else self.pairs_step(batch, stage)

    def loss_values(self, **tensors) -> dict:
        """What a preference loss may declare: `tensors` and the module's flags."""
        hp = self.hparams
        return tensors | {name: hp[name] for name in ("beta", *LOSS_FLAGS)}

    def row_losses(self, values: dict, rows: int) -> torch.Tensor:
        """The preference loss of a batch of `rows` pairs (or unpaired rows), called with the `values` it declares:
        (B,) losses, or a UserError naming `--model.loss_type` if it returns another shape."""
        losses = self.preference_loss(**{name: values[name] for name in self.loss_arguments})
        check_shape(losses, (rows,), f"--model.loss_type {self.hparams.loss_type}", f"the (B,) per-{'row' if self.unpaired else 'pair'} losses")
        return losses

    def pairs_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        """The loss of a pairs batch `[chosen; rejected]`, and DPO's statistics."""
        hp = self.hparams
        policy_chosen, policy_rejected = sequence_logps(self.model, batch).chunk(2)  # (B,) each
        chosen_lengths, rejected_lengths = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).chunk(2)  # (B,) each
        values = self.loss_values(chosen_logps=policy_chosen, rejected_logps=policy_rejected, chosen_lengths=chosen_lengths,
                                  rejected_lengths=rejected_lengths)  # fmt: skip
        if self.needs_reference:
            values["ref_chosen_logps"], values["ref_rejected_logps"] = self.reference_logps(batch).chunk(2)
            # implicit rewards, beta * (log pi - log ref), as DPO defines them
            chosen_rewards = hp.beta * (policy_chosen - values["ref_chosen_logps"]).detach()
            rejected_rewards = hp.beta * (policy_rejected - values["ref_rejected_logps"]).detach()
        else:  # without a reference, SimPO's: beta times the mean token log-prob
            chosen_rewards = hp.beta * (policy_chosen / chosen_lengths).detach()
            rejected_rewards = hp.beta * (policy_rejected / rejected_lengths).detach()
        losses = self.row_losses(values, len(policy_chosen))  # (B,)
        loss = losses.mean()
        if hp.rpo_alpha is not None:
            nll = rpo_nll_loss(policy_chosen, chosen_lengths)
            loss = loss + hp.rpo_alpha * nll
        stats = {
            "loss": loss,
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": policy_chosen.detach().mean(),
            "logps/rejected": policy_rejected.detach().mean(),
            **({"nll_loss": nll.detach()} if hp.rpo_alpha is not None else {}),
        }
        self.log_stats(stats, stage, batch_size=len(losses))
        return stats["loss"]

    def over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        """(B,) of this process -> (W * B,) the same of every process, in rank order, without gradient."""
        if self._trainer is None or self.trainer.world_size == 1:
            return tensor.detach()
        return self.all_gather(tensor.detach()).flatten()

    def unpaired_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        """The loss of an unpaired batch `[matched; mismatched]` (KTO), and its statistics: implicit rewards
        of desirable (`rewards/chosen`) and undesirable (`rewards/rejected`) rows, and the reference point `kl`."""
        hp = self.hparams
        B = len(batch["label"])
        matched = {k: v[:B] for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        mismatched = {k: v[B:] for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
        logps = sequence_logps(self.model, matched)  # (B,)
        with torch.no_grad():  # the reference point is not differentiated
            kl_logps = sequence_logps(self.model, mismatched)
        values = self.loss_values(logps=logps, kl_logps=kl_logps, labels=batch["label"],
                                  lengths=(matched["labels"][:, 1:] != IGNORE_INDEX).sum(-1))  # fmt: skip
        stats = {}
        if self.needs_reference:
            values["ref_logps"], values["ref_kl_logps"] = self.live_reference_logps(batch).chunk(2)
            rewards = hp.beta * (logps - values["ref_logps"]).detach()  # (B,)
            # KTO's reference point is a mean over the batch: over every process's rows, as one process with them all
            values["kl_logps"], values["ref_kl_logps"] = (self.over_processes(values[k]) for k in ("kl_logps", "ref_kl_logps"))
            stats["kl"] = (values["kl_logps"] - values["ref_kl_logps"]).mean().clamp(min=0)
        else:
            rewards = hp.beta * (logps / values["lengths"]).detach()
        loss = self.row_losses(values, B).mean()
        stats["loss"] = loss
        for name, rows in (("chosen", batch["label"]), ("rejected", ~batch["label"])):
            if rows.any():
                stats |= {f"rewards/{name}": rewards[rows].mean(), f"logps/{name}": logps[rows].detach().mean()}
        self.log_stats(stats, stage, batch_size=B)
        return loss


DPOModule.__init__.__doc__ = DPOModule.__init__.__doc__.replace(
    "LOSS_TYPES", "; ".join(f"`{name}` ({loss.paper}{hyperparameter_text(loss.function, PREFERENCE_LOSS_ARGUMENTS + UNPAIRED_LOSS_ARGUMENTS)})"
                            for name, loss in PREFERENCE_LOSSES.items())
).replace("LOSS_FLAG_DOCS", "\n            ".join(
    f"{name}: {flag.help} Read by " + ", ".join(f"`{loss}`" for loss, entry in PREFERENCE_LOSSES.items() if name in entry.flags) + "."
    for name, flag in LOSS_FLAGS.items()
))
