"""Degeneration while training: do the policy's answers to held-out prompts still end, and do they loop?
And on a verifiable task, do they pass (greedy pass@1, sampled pass@k)?

A preference-tuned policy can win against its base while it learns to never stop or to repeat itself;
`lit-rlhf evaluate` shows it after the run, these curves while it trains.
"""

from typing import Optional

import lightning as L
import torch

from lit_rlhf.data import ENCODED_FIELDS
from lit_rlhf.errors import UserError, check_ranges
from lit_rlhf.generation import generate_answers
from lit_rlhf.metrics import has_loop
from lit_rlhf.models import unwrap
from lit_rlhf.tasks import judges, passes


def degeneration_stats(answers: list[dict]) -> dict[str, torch.Tensor]:
    """Share of answers that end with EOS, share that loop (`metrics.has_loop`), mean length in tokens,
    from `generation.generate_answers`' answers."""
    return {
        "eos_share": torch.tensor([float(a["eos"]) for a in answers]).mean(),
        "loop_share": torch.tensor([float(has_loop(a["text"])) for a in answers]).mean(),
        "mean_length": torch.tensor([float(len(a["response"])) for a in answers]).mean(),
    }


class GenerationMonitor(L.Callback):
    def __init__(self, num_prompts: int = 16, max_new_tokens: Optional[int] = None, batch_size: int = 8, pass_at_k: int = 0, temperature: float = 1.0,
                 reward_funcs: Optional[list[str]] = None, seed: int = 0):  # fmt: skip
        """At the end of each validation, the policy answers the first `num_prompts` held-out prompts
        greedily, and `val_generations/eos_share`, `val_generations/loop_share` (a word 4-gram three
        times or more) and `val_generations/mean_length` are logged. Every process answers the same
        prompts. Models that do not generate (the reward model) are skipped.

        Args:
            num_prompts: Held-out prompts answered at each validation (0: off).
            max_new_tokens: Length cap of each answer; an answer that reaches it has not ended. null: the policy's
                `response_length` (PPO: the length its rollouts are sampled at), else 256 (where 82 % of the shipped
                rows' chosen answers end: judged shorter, an answer like them would not end).
            batch_size: Prompts generated at once.
            pass_at_k: On a verifiable task, also `val_generations/pass@1` (the greedy answers) and `val_generations/pass@k` (k
                answers sampled per prompt, one passing is enough); an answer passes when `reward_funcs` sum to 1 or more. 0: off.
            temperature: Sampling temperature of pass@k's answers.
            reward_funcs: The reward functions that judge a pass (built-ins or `file.py:function`). null: the run's `--model.reward_funcs`.
            seed: Seed of pass@k's samples, drawn from a generator of their own: the run's random stream is left as it was.
        """
        check_ranges("generations", locals(), {"num_prompts": ">= 0", "max_new_tokens": "> 0", "batch_size": "> 0", "pass_at_k": ">= 0", "temperature": "> 0"})
        self.num_prompts, self.max_new_tokens, self.batch_size = num_prompts, max_new_tokens, batch_size
        self.pass_at_k, self.temperature, self.reward_funcs, self.seed = pass_at_k, temperature, reward_funcs, seed
        self.judges: list = []  # pass@k's reward functions, imported at `setup`

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """pass@k's judges, imported now: a wrong name fails before any training."""
        wanted = self.pass_at_k and self.num_prompts
        specs = (self.reward_funcs or getattr(pl_module.hparams, "reward_funcs", None)) if wanted else None
        if wanted and not specs:
            raise UserError("--generations.pass_at_k needs reward functions that judge a pass: --generations.reward_funcs (or --model.reward_funcs)")
        self.judges = judges(specs, "--generations.reward_funcs") if specs else []

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        if trainer.sanity_checking or not self.num_prompts or model is None or not unwrap(model).can_generate():
            return
        held_out = trainer.datamodule.val_rows[: self.num_prompts]
        prompts, max_new_tokens = [row["prompt"] for row in held_out], self.max_new_tokens or getattr(pl_module.hparams, "response_length", 256)
        with trainer.precision_plugin.forward_context():
            answers = generate_answers(model, pl_module.tokenizer, prompts, max_new_tokens, self.batch_size)
        stats = degeneration_stats(answers)
        if self.judges:
            rows = [{key: value for key, value in row.items() if key not in ENCODED_FIELDS} | {"prompt": row["prompt_text"]} for row in held_out]
            stats["pass@1"] = passes(rows, answers, self.judges).mean()
            with torch.random.fork_rng(), trainer.precision_plugin.forward_context():
                torch.manual_seed(self.seed)
                sampled = [passes(rows, generate_answers(model, pl_module.tokenizer, prompts, max_new_tokens, self.batch_size, True, self.temperature), self.judges)
                           for _ in range(self.pass_at_k)]  # fmt: skip
            stats[f"pass@{self.pass_at_k}"] = torch.stack(sampled).max(0).values.mean()  # (k, N) -> one passing answer per prompt
        for name, value in stats.items():
            pl_module.log(f"val_generations/{name}", value, rank_zero_only=True)
