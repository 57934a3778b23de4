"""Degeneration while training: do the policy's answers to held-out prompts still end, and do they loop?

A preference-tuned policy can win against its base while it learns to never stop or to repeat itself;
`lit-rlhf evaluate` shows it after the run, these curves while it trains.
"""

import lightning as L
import torch

from lit_rlhf.errors import check_ranges
from lit_rlhf.forward import generate_answers
from lit_rlhf.metrics import has_loop
from lit_rlhf.models import unwrap


def degeneration_stats(answers: list[dict]) -> dict[str, torch.Tensor]:
    """Share of answers that end with EOS, share that loop (`metrics.has_loop`), mean length in tokens,
    from `forward.generate_answers`' answers."""
    return {
        "eos_share": torch.tensor([float(a["eos"]) for a in answers]).mean(),
        "loop_share": torch.tensor([float(has_loop(a["text"])) for a in answers]).mean(),
        "mean_length": torch.tensor([float(len(a["response"])) for a in answers]).mean(),
    }


class GenerationMonitor(L.Callback):
    def __init__(self, num_prompts: int = 16, max_new_tokens: int = 96, batch_size: int = 8):
        """At the end of each validation, the policy answers the first `num_prompts` held-out prompts
        greedily, and `val_generations/eos_share`, `val_generations/loop_share` (a word 4-gram three
        times or more) and `val_generations/mean_length` are logged. Every process answers the same
        prompts. Models that do not generate (the reward model) are skipped.

        Args:
            num_prompts: Held-out prompts answered at each validation (0: off).
            max_new_tokens: Length cap of each answer; an answer that reaches it has not ended.
            batch_size: Prompts generated at once.
        """
        check_ranges("generations", locals(), {"num_prompts": ">= 0", "max_new_tokens": "> 0", "batch_size": "> 0"})
        self.num_prompts, self.max_new_tokens, self.batch_size = num_prompts, max_new_tokens, batch_size

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        if trainer.sanity_checking or not self.num_prompts or model is None or not unwrap(model).can_generate():
            return
        prompts = [row["prompt"] for row in trainer.datamodule.val_rows[: self.num_prompts]]
        with trainer.precision_plugin.forward_context():
            answers = generate_answers(model, pl_module.tokenizer, prompts, self.max_new_tokens, self.batch_size)
        for name, value in degeneration_stats(answers).items():
            pl_module.log(f"val_generations/{name}", value, rank_zero_only=True)
