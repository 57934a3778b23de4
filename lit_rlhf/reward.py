"""Reward model: a sequence classifier with one scalar head, trained on (chosen, rejected) pairs."""

import torch
from torch import nn

from lit_rlhf.base import DEFAULT_MODEL, AlignmentModule
from lit_rlhf.losses import reward_loss
from lit_rlhf.forward import sequence_scores
from lit_rlhf.models import add_lora, load_scalar_model, load_tokenizer


class RewardModule(AlignmentModule):
    algorithm = "reward"
    progress_bar_metrics = ("loss", "accuracy")
    flag_ranges = AlignmentModule.flag_ranges | {"margin": ">= 0"}
    resume_applies = AlignmentModule.resume_applies + ("margin",)

    def __init__(
        self, model_name_or_path: str = DEFAULT_MODEL, learning_rate: float = 3e-4, margin: float = 0.0,
        gradient_checkpointing: bool = True, **kwargs,
    ):  # fmt: skip
        """Bradley-Terry reward model; the score is the head's output at the last real token.

        Args:
            model_name_or_path: Hub id, local folder or .gguf file: a causal LM (the scalar head is
                new) or an existing reward model.
            learning_rate: Peak AdamW learning rate.
            margin: Loss margin: `-log sigmoid(r_chosen - r_rejected - margin)`.
            gradient_checkpointing: On by default for the reward model: at the recipe's batch 8 and max
                length 512 it cuts peak memory by more than half for a few percent of speed
                (docs/speed.md).
        """
        super().__init__(model_name_or_path=model_name_or_path, learning_rate=learning_rate,
                         gradient_checkpointing=gradient_checkpointing, **kwargs)  # fmt: skip
        self.tokenizer = load_tokenizer(model_name_or_path, self.hparams.trust_remote_code)
        self.model = self.load_trained_model()

    def load_trained_model(self) -> nn.Module:
        """The reward model as it starts: a scalar head on the base model, with its LoRA adapter if any."""
        model = load_scalar_model(self.hparams.model_name_or_path, self.tokenizer.pad_token_id, **self.load_args())
        return add_lora(model, **self.lora_args(), task_type="SEQ_CLS")

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of the chosen and of the rejected rows of a pairs batch: two (B,) tensors."""
        scores = sequence_scores(self.model, batch)  # (2B,)
        return scores.chunk(2)

    def shared_step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        chosen, rejected = self(batch)
        loss = reward_loss(chosen, rejected, self.hparams.margin)
        stats = {
            "loss": loss,
            "accuracy": (chosen > rejected).float().mean(),
            "margin": (chosen - rejected).mean(),
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
        }
        self.log_stats(stats, stage, batch_size=len(chosen))
        return loss
