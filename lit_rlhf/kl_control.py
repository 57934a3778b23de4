"""An adaptive KL coefficient for PPO (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
section 2.2): after each step the coefficient of the KL penalty moves so that the rollouts' KL to the reference
settles near a target, instead of drifting further with every step as it does at a fixed coefficient.

    lit-rlhf fit -c configs/ppo.yaml --kl_control.target 4 --kl_control.horizon 64
"""

from typing import Optional

import lightning as L

from lit_rlhf.errors import UserError, check_ranges


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, n: int, horizon: float) -> float:
    """The next KL coefficient after a step of `n` rollouts whose mean KL to the reference (each response's summed over
    its tokens, nats) was `kl`: kl_coef * (1 + e * n / horizon), e = KL / target - 1 clipped to [-0.2, 0.2]. Above the
    target the penalty grows, below it shrinks; `horizon` rollouts at the largest error change it by a factor e^0.2."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n / horizon)


class AdaptiveKLController(L.Callback):
    def __init__(self, target: Optional[float] = None, horizon: float = 10000):
        """PPO's `--model.kl_coef` adapted after each step to hold `objective/kl` near `target`
        (`adaptive_kl_coef`); logged as `objective/kl_coef`, kept in checkpoints (a resume continues from the
        adapted value, not from `--model.kl_coef`). For PPO with a KL to the reference (`--model.kl_coef` > 0).

        Args:
            target: The rollouts' KL to hold, in nats per response (`objective/kl`). null: a fixed coefficient.
            horizon: Rollouts over which the coefficient follows the error (Ziegler et al.: 10,000; a run of a few
                hundred rollouts wants its own length or less).
        """
        check_ranges("kl_control", locals(), {"target": "> 0", "horizon": "> 0"})
        self.target, self.horizon = target, horizon
        self.kl_coef: Optional[float] = None  # the adapted coefficient, once a step has run or a checkpoint set it
        self.step = -1  # the global step the coefficient was last adapted at

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.target is not None and not pl_module.hparams.get("kl_coef"):  # PPO's penalty, > 0
            raise UserError("--kl_control.target adapts PPO's KL penalty: it needs --model.class_path lit_rlhf.ppo.PPOModule with --model.kl_coef > 0")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.target is not None and self.kl_coef is not None:  # resumed
            pl_module.hparams.kl_coef = self.kl_coef

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        kl = trainer.callback_metrics.get("objective/kl")  # averaged over the processes: each adapts alike
        if self.target is None or kl is None or trainer.global_step == self.step:  # a skipped step updated nothing
            return
        hp = pl_module.hparams
        pl_module.log("objective/kl_coef", float(hp.kl_coef))  # the coefficient this step's rewards used
        rollouts = len(batch["input_ids"]) * hp.num_generations * trainer.world_size
        self.kl_coef = hp.kl_coef = adaptive_kl_coef(hp.kl_coef, kl.item(), self.target, rollouts, self.horizon)
        self.step = trainer.global_step

    def state_dict(self) -> dict:
        return {"kl_coef": self.kl_coef, "step": self.step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.kl_coef, self.step = state_dict["kl_coef"], state_dict["step"]
