"""PPO for language models, after Huang et al. 2024, "The N+ implementation details of RLHF with PPO",
and the critic-free estimators that share its rollout and clipped update.

One training step reads top to bottom:
    rollout()            sample num_generations responses per prompt (lit_rlhf/rollout_engines.py), score them
                         (lit_rlhf/rewards.py), old log-probs, reference log-probs, values (gae only)
    compute_advantages() per-token KL penalty, then the advantages of `advantage_estimator`
    update()             ppo_epochs passes over minibatches of whole groups: clipped policy loss
                         (+ value loss for gae, + KL loss with kl_in_loss)
then `log_step` logs what the step measured (lit_rlhf/rollout.py `step_stats`).

Only the advantage differs between estimators: one function each in `estimators.ESTIMATORS`, which
also says whether it compares the k = `num_generations` responses of a prompt (rloo, grpo, dr_grpo)
and how the per-token losses are aggregated. An estimator that declares `values` (gae) gets a value
model; the others load none. The class keeps the name PPOModule, which configs and checkpoints name:
every estimator shares PPO's update.

With several processes (DDP, FSDP, DeepSpeed) each process rolls out its own share of the prompts:
- sampling: at the start of `fit` each process reseeds torch's RNG with one number drawn from the
  common stream plus its rank, so the processes sample different responses. A checkpoint keeps rank
  0's RNG state; a resumed run reseeds each rank from it again, so its samples are deterministic but
  not the ones the uninterrupted run would have drawn (one process resumes exactly);
- whitening (gae, reinforce_pp): the advantages' mean and std are all-reduced, those of every process's
  tokens together, as in one process with all the prompts. Groups (rloo, grpo, dr_grpo) never span
  processes: each process samples all k responses of its own prompts;
- generation: under DDP each process holds the whole policy, so the HF engine samples without
  collectives and a process that stops early (every response at EOS) waits for nobody. Under FSDP or
  DeepSpeed ZeRO-3 the parameters are sharded and every forward is a collective: `model.generate(synced_gpus=True)`
  keeps every process stepping until all are done (lit_rlhf/rollout_engines.py). (ZeRO-2 shards optimizer
  state and gradients only.)
"""

import math
from dataclasses import replace
from functools import partial
from typing import Callable, Literal, Optional

import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lit_rlhf.base import DEFAULT_MODEL, AlignmentModule
from lit_rlhf.errors import UserError
from lit_rlhf.estimators import ESTIMATOR_ARGUMENTS, ESTIMATORS, Estimator, checked_estimate
from lit_rlhf.losses import ppo_value_loss, truncated_importance_weights
from lit_rlhf.policy_losses import POLICY_LOSS_ARGUMENTS, POLICY_LOSSES, aggregate_token_losses, checked_policy_loss
from lit_rlhf.distributed import no_backward_sync, sum_over_processes
from lit_rlhf.forward import sequence_scores, token_logps, token_logps_and_entropies, token_values
from lit_rlhf.models import add_lora, as_reference, check_same_vocabulary, load_causal_lm, load_scalar_model, load_tokenizer
from lit_rlhf.ops import KL_ESTIMATORS, flat_groups, group_minibatches, kl_estimate
from lit_rlhf.plugins import declared_arguments, resolve
from lit_rlhf.reward_functions import REWARD_FUNCTIONS
from lit_rlhf.rewards import RewardFunctions, RewardModel, Rewards, Responses
from lit_rlhf.rollout import Rollout, Stopwatch, concatenated, joined, samples_table, step_stats
from lit_rlhf.rollout_engines import ROLLOUT_ENGINES, HFRollout, RolloutEngine, summary

Batch = dict[str, torch.Tensor]  # input_ids, attention_mask, labels: (B, P + R), prompts left-padded
ESTIMATOR_CONTRACT = (
    "an advantage estimator is called with any of the keyword arguments " + ", ".join(ESTIMATOR_ARGUMENTS)
    + " that it declares and returns (advantages, returns or None) (lit_rlhf/estimators.py)"
)
# the names a policy loss's statistics are logged under (any other `name` as `policy/<name>`)
POLICY_STATS = {"clipfrac": "policy/clipfrac_avg", "approxkl": "policy/approxkl_avg", "ratio": "val/ratio"}
POLICY_LOSS_CONTRACT = (
    "a policy loss is called with any of the keyword arguments " + ", ".join(POLICY_LOSS_ARGUMENTS)
    + " that it declares and returns (per-token losses (B, T), a dict of statistics) (lit_rlhf/policy_losses.py)"
)


def with_table_entries(init):
    """`init` with its docstring's placeholders (ESTIMATOR_NAMES, KL_PLACEMENT, KL_NAMES, POLICY_LOSS_NAMES, POLICY_LOSS_ARGUMENTS,
    ROLLOUT_ENGINE_NAMES, REWARD_NAMES) replaced by the entries of the tables: what `--help` prints of each flag."""
    names = {
        "ESTIMATOR_NAMES": "; ".join(f"`{name}` ({estimator.paper})" for name, estimator in ESTIMATORS.items()),
        "KL_PLACEMENT": "; ".join(f"in the {where} for " + ", ".join(name for name, e in ESTIMATORS.items() if e.kl_in_loss == in_loss)
                                  for where, in_loss in (("reward", False), ("loss", True))),
        "KL_NAMES": "; ".join(f"`{name}` ({paper})" for name, (_, paper) in KL_ESTIMATORS.items()),
        "POLICY_LOSS_NAMES": "; ".join(f"`{name}` ({paper})" for name, (_, paper) in POLICY_LOSSES.items()),
        "POLICY_LOSS_ARGUMENTS": ", ".join(POLICY_LOSS_ARGUMENTS),
        "ROLLOUT_ENGINE_NAMES": "; ".join(f"`{name}` ({summary(engine)})" for name, engine in ROLLOUT_ENGINES.items()),
        "REWARD_NAMES": ", ".join(f"`{name}`" for name in REWARD_FUNCTIONS),
    }  # fmt: skip
    for placeholder, text in names.items():
        init.__doc__ = init.__doc__.replace(placeholder, text)
    return init


class PPOModule(AlignmentModule):
    algorithm = "ppo"
    progress_bar_metrics = ("objective/scores", "objective/kl")
    frozen_modules = ("ref_model", "reward_model")
    trained_modules = ("model", "value_model")  # critic-free estimators: ("model",), set in __init__
    resume_applies = AlignmentModule.resume_applies + (
        "response_length", "temperature", "missing_eos_penalty", "kl_coef", "kl_estimator", "kl_loss_estimator", "kl_in_loss", "gamma", "lam", "ppo_epochs", "cliprange",
        "cliprange_high", "loss_aggregation", "mask_truncated_completions", "entropy_coef", "dynamic_sampling_max_rounds", "cliprange_value", "vf_coef", "max_grad_norm",
        "importance_sampling_cap", "reward_timeout", "reward_errors", "reward_memory_limit", "overlong_max_length", "overlong_buffer_length", "rollout_batch_size", "sample_every_n_steps", "rollout_engine", "vllm_gpu_memory_utilization",
    )  # fmt: skip
    flag_ranges = AlignmentModule.flag_ranges | {
        "response_length": "> 0", "temperature": "> 0", "num_generations": "> 0", "kl_coef": ">= 0", "gamma": "in [0, 1]", "lam": "in [0, 1]",
        "ppo_epochs": "> 0", "num_minibatches": "> 0", "gradient_accumulation_steps": "> 0", "rollout_batch_size": "> 0", "cliprange": "> 0",
        "cliprange_high": "> 0", "cliprange_value": "> 0", "vf_coef": ">= 0", "max_grad_norm": "> 0", "sample_every_n_steps": "> 0",
        "importance_sampling_cap": ">= 1", "vllm_gpu_memory_utilization": "in (0, 1]", "entropy_coef": ">= 0",
        "overlong_max_length": "> 0", "overlong_buffer_length": "> 0", "dynamic_sampling_max_rounds": ">= 0",
    }  # fmt: skip

    @with_table_entries
    def __init__(
        self,
        reward_model_path: Optional[str] = None,
        model_name_or_path: str = DEFAULT_MODEL,
        reward_funcs: Optional[list[str]] = None,
        reward_weights: Optional[list[float]] = None,
        reward_timeout: float = 30.0,
        reward_errors: Literal["stop", "none"] = "stop",
        reward_memory_limit: Optional[float] = None,
        overlong_max_length: Optional[int] = None,
        overlong_buffer_length: Optional[int] = None,
        value_model_path: Optional[str] = None,
        learning_rate: float = 1e-5,
        response_length: int = 128,
        temperature: float = 0.7,
        missing_eos_penalty: Optional[float] = None,
        advantage_estimator: str = "gae",
        num_generations: int = 1,
        kl_coef: float = 0.05,
        kl_estimator: str = "k1",
        kl_loss_estimator: str = "k3",
        kl_in_loss: Optional[bool] = None,
        gamma: float = 1.0,
        lam: float = 0.95,
        ppo_epochs: int = 4,
        num_minibatches: int = 1,
        gradient_accumulation_steps: int = 4,
        rollout_batch_size: int = 64,
        policy_loss: str = "ppo",
        cliprange: float = 0.2,
        cliprange_high: Optional[float] = None,
        loss_aggregation: Optional[Literal["token_mean", "sequence_mean", "constant"]] = None,
        mask_truncated_completions: bool = False,
        entropy_coef: float = 0.0,
        dynamic_sampling_max_rounds: int = 0,
        cliprange_value: float = 0.2,
        vf_coef: float = 0.1,
        max_grad_norm: float = 1.0,
        sample_every_n_steps: int = 10,
        rollout_engine: str = "hf",
        importance_sampling_cap: Optional[float] = 2.0,
        vllm_gpu_memory_utilization: float = 0.3,
        **kwargs,
    ):
        """PPO and its critic-free relatives (RLOO, GRPO, Dr. GRPO, REINFORCE++), the estimator a flag.

        A policy, a frozen reference (none with `kl_coef` 0), a frozen reward model and, with `gae`, a value model. One PPO step
        takes one batch of `--data.batch_size` prompts (prompts mode) and samples `num_generations`
        responses to each.

        Args:
            reward_model_path: Reward model folder (e.g. `logs/reward/version_0/hf`); with `gae` also the
                initial value model. Optional when `reward_funcs` are given.
            model_name_or_path: Hub id, local folder or .gguf file of the policy to train.
            reward_funcs: Reward functions (RL from verifiable rewards): built-ins REWARD_NAMES, or
                `module:function` / `file.py:function` of your own, called as TRL calls them:
                `f(prompts, completions, **columns) -> list[float | None]`, the columns being the prompt rows'
                other fields (e.g. `answer`), one entry per response; None: the function does not apply to
                that row, which leaves it out of the row's total (lit_rlhf/rewards.py).
            reward_weights: One weight per reward source, the reward model first, then `reward_funcs` in
                order (default: 1 each). A response's score is the weighted sum of the sources that apply.
            reward_timeout: Seconds a reward function may take for one batch; it runs in a worker process.
            reward_errors: What a reward function that hangs or raises does: `stop` the run with a line
                naming the function, the row and the error, or give that call's rows `none` (counted).
            reward_memory_limit: GiB of resident memory the reward worker may use (Linux): past half of it a
                warning, past it the worker is stopped and the call fails like `reward_errors` says. Off if null.
            overlong_max_length: L_max of `soft_overlong_punishment` (DAPO's soft overlong punishment, Yu et al. 2025,
                eq. 13): a response of |y| tokens gets 0 up to L_max - L_cache, falls linearly to -1 at L_max, -1 beyond.
                null: `response_length`. Any reward function that declares `overlong_max_length` gets it.
            overlong_buffer_length: L_cache of `soft_overlong_punishment`, the tokens before L_max over which the
                penalty grows (DAPO: 4096 of 20480). null: a fifth of L_max.
            value_model_path: Where the value model (gae) starts: default the reward model, else (no reward
                model) the policy's backbone with a new scalar head.
            learning_rate: Peak AdamW learning rate (policy and, with `gae`, value model).
            response_length: Tokens generated per prompt.
            temperature: Sampling temperature of the rollouts (log-probs use the same one).
            missing_eos_penalty: Subtracted from the score of responses with no EOS (off if null).
            advantage_estimator: How each response's tokens are credited: ESTIMATOR_NAMES; or
                `module:function` / `file.py:function`, a function of your own with the same contract, or
                an `Estimator` (lit_rlhf/estimators.py). `gae` trains a value model; the others load none
                (none trained, none in checkpoints). rloo, grpo and dr_grpo need `num_generations` >= 2.
            num_generations: Responses sampled per prompt (k): a batch of B prompts rolls out B * k
                responses. The k responses of a prompt form a group, kept in one minibatch and on the
                process that holds the prompt.
            kl_coef: Weight of the KL to the reference (a reward penalty, or with `kl_in_loss` a loss term). 0 (as
                DAPO and TRL's GRPO default): no reference is loaded nor scored, and `objective/kl` is not logged.
                A resume may change it either way: the reference is reloaded from `model_name_or_path`, never
                kept in checkpoints.
            kl_estimator: The per-token KL estimate of the reward penalty and `objective/kl`, from the log-ratio
                log r = log p - log q of each sampled token: KL_NAMES (lit_rlhf/ops.py `KL_ESTIMATORS`).
            kl_loss_estimator: The per-token KL estimate of the loss term with `kl_in_loss`, one of the same:
                `k3` (GRPO), `low_var_kl` (verl's default), `k2` (its gradient is the KL's in expectation); k1's
                expected gradient is 0.
            kl_in_loss: false: the KL is a per-token reward penalty `-kl_coef * KL_t` (`kl_estimator`; rloo, grpo
                and dr_grpo add its sum over the response to the score). true (GRPO): the reward has no KL, and
                the loss adds `kl_coef` times `kl_loss_estimator` per response token, aggregated like the policy
                loss. null: where the estimator's paper puts it (KL_PLACEMENT). Either way `objective/kl` is the
                rollout's KL by `kl_estimator` and `objective/rlhf_reward` the score minus `kl_coef` times it.
            gamma: GAE discount (`gae`).
            lam: GAE lambda (`gae`).
            ppo_epochs: Passes over each rollout batch.
            num_minibatches: Optimizer steps per pass: the batch's groups are shuffled and split into this
                many minibatches. `--data.batch_size` must split into them, and each minibatch's rows into
                `gradient_accumulation_steps` micro-batches.
            gradient_accumulation_steps: Micro-batches per minibatch, gradients accumulated by hand.
            rollout_batch_size: Rows per forward of the rollout's scoring (log-probs, reference log-probs,
                values, scores; no gradients, so little memory), as TRL's `local_rollout_forward_batch_size`.
                At the recipe's 16 prompts one forward of 16 rows instead of 4 of 4. Lower it to save memory.
            policy_loss: The policy's loss on each response token: POLICY_LOSS_NAMES; or `module:function` /
                `file.py:function`, a function of your own called with any of the keyword arguments
                POLICY_LOSS_ARGUMENTS it declares, returning (per-token losses (B, T), a dict of statistics)
                (lit_rlhf/policy_losses.py).
            cliprange: Clip range of the policy ratio, the low side: the ratio is clipped to [1 - cliprange,
                1 + cliprange_high].
            cliprange_high: The high side of the clip range (null: `cliprange`, symmetric). Larger, e.g. 0.28
                with cliprange 0.2, is DAPO's clip-higher (Yu et al. 2025): tokens with a positive advantage may
                rise further before their gradient is cut, against the entropy collapse of a symmetric clip.
            loss_aggregation: How the per-token losses become one (lit_rlhf/policy_losses.py
                `aggregate_token_losses`): `token_mean` over every token of the batch (DAPO's token-level loss,
                Yu et al. 2025), `sequence_mean` per response then over responses (GRPO), `constant` each
                response's sum / `response_length` (Dr. GRPO, Liu et al. 2025). null: the estimator's own.
            mask_truncated_completions: Responses that reach `response_length` without EOS get no policy loss (and
                no KL loss with `kl_in_loss`): DAPO's overlong filtering (Yu et al. 2025), TRL's
                `mask_truncated_completions`. They are still sampled, scored and in the advantages' baselines.
            entropy_coef: An entropy bonus: the loss subtracts `entropy_coef` times the exact entropy of the policy's
                next-token distribution at each response token, aggregated like the policy loss (Williams and Peng
                1991; PPO, Schulman et al. 2017, eq. 9; verl's `entropy_coeff`). 0: no bonus, no entropy computed in the
                update (`objective/entropy` is logged either way, from the rollout's pass).
            dynamic_sampling_max_rounds: DAPO's dynamic sampling (Yu et al. 2025, sec. 3.2): a group whose k scores are
                all equal has no advantage, so it is dropped and the step samples the next batches of prompts of the
                same training order, at most this many more, until `--data.batch_size` groups have a signal (the
                surplus is dropped; short after the last round, flat groups fill the batch). The batches it takes are
                the next steps' (the epoch has fewer steps) and a checkpoint resumes after them. Logged:
                `rollout/sampling_rounds`, `rollout/flat_group_share` (of every group sampled). 0: off. Group
                estimators only (rloo, grpo, dr_grpo).
            cliprange_value: Clip range of the value prediction (`gae`).
            vf_coef: Weight of the value loss (`gae`).
            max_grad_norm: Gradient norm clip of each optimizer step.
            sample_every_n_steps: Log a table of prompt / response / score to TensorBoard every N PPO steps.
            rollout_engine: Who samples the rollouts: ROLLOUT_ENGINE_NAMES; or `module:Class` / `file.py:Class`, an
                engine of your own (lit_rlhf/rollout_engines.py). Either way the old log-probs are the trainer's own;
                `rollout/logprob_diff` logs how far the engine's differ (vLLM's). Validation answers use `hf`.
            importance_sampling_cap: With `vllm`: each token's policy loss is weighted by min(p_trainer / p_vllm,
                cap), truncated importance sampling for the engines' mismatch (Yao et al. 2025; TRL's
                `vllm_importance_sampling_cap`). null: no correction.
            vllm_gpu_memory_utilization: Share of the GPU's memory the vLLM engine may take (colocated with training).
        """
        super().__init__(model_name_or_path=model_name_or_path, learning_rate=learning_rate, **kwargs)
        entry = resolve(advantage_estimator, ESTIMATORS, "--model.advantage_estimator")
        self.estimator = entry if isinstance(entry, Estimator) else Estimator(entry, paper=advantage_estimator)
        flag = "--model.advantage_estimator"
        self.estimator_arguments = declared_arguments(self.estimator.function, ESTIMATOR_ARGUMENTS, flag, ESTIMATOR_CONTRACT)
        self.engine_class = resolve(rollout_engine, ROLLOUT_ENGINES, "--model.rollout_engine")
        entry = resolve(policy_loss, POLICY_LOSSES, "--model.policy_loss")
        self.policy_loss = entry[0] if isinstance(entry, tuple) else entry
        if not callable(self.policy_loss):
            raise UserError(f"--model.policy_loss {policy_loss}: not a function")
        self.policy_loss_arguments = declared_arguments(self.policy_loss, POLICY_LOSS_ARGUMENTS, "--model.policy_loss", POLICY_LOSS_CONTRACT)
        self.aggregation = loss_aggregation or self.estimator.aggregation
        for flag, name in (("kl_estimator", kl_estimator), ("kl_loss_estimator", kl_loss_estimator)):
            if name not in KL_ESTIMATORS:
                raise UserError(f"--model.{flag} {name}: not one of {', '.join(KL_ESTIMATORS)}")
        self.kl_in_loss = self.estimator.kl_in_loss if kl_in_loss is None else kl_in_loss
        if dynamic_sampling_max_rounds and not self.estimator.groups:
            raise UserError(f"--model.dynamic_sampling_max_rounds drops groups whose k responses scored alike: it needs a group"
                            f" estimator (rloo, grpo, dr_grpo), not --model.advantage_estimator {advantage_estimator}")  # fmt: skip
        if self.estimator.groups and num_generations < 2:
            raise UserError(
                f"--model.advantage_estimator {advantage_estimator} compares the responses to one prompt: it needs"
                f" --model.num_generations 2 or more (e.g. 4), not {num_generations}"
            )
        if reward_model_path is None and not reward_funcs:
            raise UserError("PPO needs a reward: --model.reward_model_path (a reward model) and/or --model.reward_funcs (functions)")
        self.reward_functions = RewardFunctions(reward_funcs or [], reward_timeout, reward_errors, reward_memory_limit,
                                                self.reward_settings(overlong_max_length or response_length, overlong_buffer_length))  # fmt: skip
        model_source = [RewardModel(self.reward_model_scores)] if reward_model_path else []
        self.rewards = Rewards(model_source + self.reward_functions.sources(), reward_weights)  # the reward model first
        self.automatic_optimization = False
        hp = self.hparams
        self.tokenizer = load_tokenizer(model_name_or_path, hp.trust_remote_code)
        pad_id = self.tokenizer.pad_token_id
        self.model = self.load_trained_model()
        self.ref_model = None  # none without a KL; with LoRA the reference is the policy with its adapter disabled
        if self.needs_reference and not hp.lora_r:
            self.ref_model = load_causal_lm(model_name_or_path, **self.load_args()).requires_grad_(False)
        self.reward_model = None
        if reward_model_path:
            check_same_vocabulary(self.tokenizer, reward_model_path, "--model.reward_model_path")
            self.reward_model = load_scalar_model(reward_model_path, pad_id, trained_head=True, **self.load_args()).requires_grad_(False)
        if "values" in self.estimator_arguments:
            if value_model_path:
                check_same_vocabulary(self.tokenizer, value_model_path, "--model.value_model_path")
            value_model = load_scalar_model(value_model_path or reward_model_path or model_name_or_path, pad_id, **self.load_args())
            self.value_model = add_lora(value_model, **self.lora_args(), task_type="SEQ_CLS")
        else:  # critic-free: no value weights to train, optimise or checkpoint
            self.value_model, self.trained_modules = None, ("model",)
        self.engine: Optional[RolloutEngine] = None  # started by `started_engine`
        self.stopwatch = Stopwatch()  # the wall time of each phase of the step, for `time/*`

    @staticmethod
    def reward_settings(max_length: int, buffer_length: Optional[int]) -> dict[str, int]:
        """The run's settings a reward function may declare by name: L_max and L_cache of the soft overlong punishment
        (`buffer_length` null: L_max // 5, at least 1), checked."""
        buffer_length = buffer_length or max(1, max_length // 5)
        if buffer_length > max_length:
            raise UserError(f"--model.overlong_buffer_length {buffer_length} is longer than the max length {max_length} it ends at"
                            " (--model.overlong_max_length, default --model.response_length)")  # fmt: skip
        return {"overlong_max_length": max_length, "overlong_buffer_length": buffer_length}

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm is not None and dm.hparams.mode != "prompts":
            raise UserError("PPO reads prompts only: set --data.mode prompts")
        if dm is not None and stage == "fit":
            self.check_batch_size(dm.hparams.batch_size)

    def check_batch_size(self, batch_size: int) -> None:
        """Refuse a batch of prompts (per process) that does not split evenly: its groups into `num_minibatches`
        minibatches, each minibatch's rows into `gradient_accumulation_steps` micro-batches."""
        hp = self.hparams
        k, steps = hp.num_generations, hp.num_minibatches * hp.gradient_accumulation_steps
        multiple = math.lcm(hp.num_minibatches, steps // math.gcd(steps, k))  # B % multiple == 0 <=> both splits are even
        if batch_size % multiple:
            raise UserError(
                f"--data.batch_size {batch_size} prompts x --model.num_generations {k} responses do not split into"
                f" --model.num_minibatches {hp.num_minibatches} minibatches of whole groups of {k}, each of"
                f" --model.gradient_accumulation_steps {hp.gradient_accumulation_steps} equal micro-batches:"
                f" use a batch size that is a multiple of {multiple}"
            )

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.trainer.world_size > 1:  # the same seed on every process would sample alike: offset it by rank
            torch.manual_seed(int(torch.randint(2**62, ())) + self.global_rank)
        self.started_engine()

    def started_engine(self) -> RolloutEngine:
        """The engine of `--model.rollout_engine` (lit_rlhf/rollout_engines.py), started on first use: in a run, when
        `fit` starts (vLLM's start-up is not a rollout's time)."""
        if self.engine is None:
            self.engine = self.engine_class(self)
        return self.engine

    @property
    def needs_reference(self) -> bool:
        """True if a KL to the reference is computed (`kl_coef` > 0): only then is a reference loaded and scored."""
        return self.hparams.kl_coef > 0

    def sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        return sum_over_processes(self._trainer, tensor)

    # ---- the three phases -------------------------------------------------------------------

    def micro_batch_size(self, batch_size: int) -> int:
        """Rows per forward/backward: rollout rows (B * k) / (num_minibatches * gradient_accumulation_steps)."""
        return max(1, batch_size // (self.hparams.num_minibatches * self.hparams.gradient_accumulation_steps))

    def response_logps(self, model, batch: Batch, context_length: int) -> torch.Tensor:
        """Log-probs of the response tokens under `model`, at the sampling temperature. -> (B, R)"""
        return token_logps(model, batch, self.hparams.temperature)[:, context_length - 1 :]

    def response_logps_and_entropies(self, model, batch: Batch, context_length: int) -> torch.Tensor:
        """`response_logps` and the entropy of the distribution each response token was drawn from, from the same
        chunks of logits. -> (B, R, 2): log-prob, entropy"""
        logps, entropies = token_logps_and_entropies(model, batch, self.hparams.temperature)  # (B, T - 1) each
        return torch.stack([logps, entropies], -1)[:, context_length - 1 :]

    def values(self, batch: Batch, context_length: int) -> torch.Tensor:
        """V(s_t) for the state before each response token. -> (B, R)"""
        return token_values(self.value_model, batch)[:, context_length - 1 : -1]

    def score(self, batch: Batch, context_length: int) -> torch.Tensor:
        """Reward-model score of each prompt + response, read at its last real token. -> (B,)

        `context_length` (where responses start) is there for rewards that read the response only.
        """
        return sequence_scores(self.reward_model, batch)

    @torch.no_grad()
    def rollout(self, batch: dict[str, torch.Tensor]) -> Rollout:
        """Sample `num_generations` responses per prompt with the rollout engine, score them with the reward sources,
        then old log-probs, reference log-probs and (with a value model) values, `rollout_batch_size` rows per forward."""
        hp, k = self.hparams, self.hparams.num_generations
        engine = self.started_engine()
        with self.stopwatch("generation"):
            engine.sync(self.model)
            samples = engine.sample(batch, k, hp.response_length, hp.temperature)  # (B * k, R), groups contiguous
        answered = joined(batch, samples, k)  # input_ids, attention_mask, labels: (B * k, P + R)
        P = batch["input_ids"].shape[1]
        responses = Responses.of(batch, answered, k, self.decode)
        source_scores = self.rewards(responses)  # (B * k, F)
        scores = self.rewards.total(source_scores)
        if hp.missing_eos_penalty is not None:
            scores = scores - hp.missing_eos_penalty * (~samples.contains_eos).float()
        logprobs, entropies = self.in_chunks(partial(self.response_logps_and_entropies, self.model), answered, P).unbind(-1)
        ref_logprobs = None
        if self.needs_reference:
            with as_reference(self.model, self.ref_model) as reference:
                ref_logprobs = self.in_chunks(partial(self.response_logps, reference), answered, P)
        values = self.in_chunks(self.values, answered, P) if self.value_model is not None else None
        return Rollout(
            **answered, response_mask=samples.response_mask.float(), contains_eos=samples.contains_eos, logprobs=logprobs, entropies=entropies,
            ref_logprobs=ref_logprobs, scores=scores, values=values,
            source_scores=source_scores, sampler_logprobs=samples.sampler_logprobs, prompt_text=responses.prompts,
        )  # fmt: skip

    def dynamically_sampled(self, rollout: Rollout) -> tuple[Rollout, dict[str, torch.Tensor]]:
        """DAPO's dynamic sampling (Yu et al. 2025, sec. 3.2): the B groups of `rollout` with a signal (scores not all
        equal), and while fewer than B (in any process: all sample the same number of rounds), those of rollouts of the
        next batches of the training loader, at most `dynamic_sampling_max_rounds` more; the first B groups with a signal,
        then flat ones if short. Also the statistics `rollout/sampling_rounds` and `rollout/flat_group_share`."""
        k, B = self.hparams.num_generations, len(rollout.scores) // self.hparams.num_generations
        rollouts = [rollout]
        for _ in range(self.hparams.dynamic_sampling_max_rounds):
            short = sum(int((~flat_groups(r.scores, k)).sum()) for r in rollouts) < B
            if not self.sum_over_processes(torch.tensor(float(short), device=self.device)):
                break
            batch = self.trainer.train_dataloader.next_batch()
            if batch is None:  # the epoch has no batch left
                break
            rollouts.append(self.rollout(self.transfer_batch_to_device(batch, self.device, 0)))
        sampled = concatenated(rollouts)
        flat = flat_groups(sampled.scores, k)  # (G,)
        groups = (torch.cat([(~flat).nonzero(), flat.nonzero()])[:B, 0] * k)[:, None] + torch.arange(k, device=flat.device)  # (B, k)
        stats = {"rollout/sampling_rounds": torch.tensor(float(len(rollouts)), device=self.device), "rollout/flat_group_share": flat.float().mean()}
        return sampled.rows(groups.flatten().tolist()), stats

    def in_chunks(self, function: Callable[[Batch, int], torch.Tensor], batch: Batch, context_length: int) -> torch.Tensor:
        """`function(rows, context_length)` over `batch`'s rows, `rollout_batch_size` rows per call, concatenated. -> (N, ...)"""
        rows = torch.arange(len(batch["input_ids"]), device=batch["input_ids"].device).split(self.hparams.rollout_batch_size)
        return torch.cat([function({key: value[r] for key, value in batch.items()}, context_length) for r in rows])

    def reward_model_scores(self, batch: Batch, context_length: int) -> torch.Tensor:
        """The reward source `reward_model`: `score` of each prompt + response, `rollout_batch_size` rows per forward. -> (N,)"""
        return self.in_chunks(self.score, batch, context_length)

    def decode(self, ids) -> str:
        """A response's token ids (R,) (a tensor or a list) as text, special tokens skipped: what reward functions read."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def teardown(self, stage: str) -> None:
        self.reward_functions.close()

    @torch.no_grad()
    def compute_advantages(self, rollout: Rollout) -> Rollout:
        """The per-token rewards, then the advantages (N, R) of the estimator (and its returns, the value targets).

        The rewards are the KL penalty `-kl_coef * KL_t` on every response token (none with `kl_in_loss`)
        plus the score on the response's last token; an estimator that credits whole responses (rloo, grpo,
        dr_grpo) sums them per response."""
        hp = self.hparams
        response_mask = rollout.response_mask  # (N, R), N = B * k
        kl = kl_estimate(rollout.logprobs, rollout.ref_logprobs, hp.kl_estimator) * response_mask if self.needs_reference else None
        non_score_reward = -hp.kl_coef * kl if self.needs_reference else torch.zeros_like(response_mask)  # (N, R)
        rewards = torch.zeros_like(response_mask) if self.kl_in_loss else non_score_reward.clone()
        last = response_mask.sum(-1).long() - 1  # (N,) index of the last response token
        rewards[torch.arange(len(last)), last] += rollout.scores
        inputs = {"rewards": rewards, "mask": response_mask, "values": rollout.values, "k": hp.num_generations,
                  "gamma": hp.gamma, "lam": hp.lam, "sum_over_processes": self.sum_over_processes}  # fmt: skip
        estimate = self.estimator.function(**{name: inputs[name] for name in self.estimator_arguments})
        advantages, returns = checked_estimate(estimate, hp.advantage_estimator, rewards.shape)
        return replace(rollout, kl=kl, non_score_reward=non_score_reward, advantages=advantages, returns=returns)

    def micro_batch_loss(self, rollout: Rollout, rows: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The loss of rollout `rows`: the policy loss (`policy_loss`, aggregated by `loss_aggregation`), + KL loss
        with `kl_in_loss`, - entropy bonus with `entropy_coef`, + value loss with a value model; and its statistics.
        With `mask_truncated_completions` the policy, KL and entropy terms leave out the responses without EOS."""
        hp = self.hparams
        batch, P = rollout.model_inputs(rows), rollout.context_length
        response_mask = rollout.response_mask[rows]  # (n, R)
        loss_mask = response_mask * rollout.contains_eos[rows, None] if hp.mask_truncated_completions else response_mask
        if hp.entropy_coef:
            logprobs, entropies = self.response_logps_and_entropies(self.model, batch, P).unbind(-1)  # (n, R) each
        else:
            logprobs = self.response_logps(self.model, batch, P)  # (n, R)
        weights = None
        if rollout.sampler_logprobs is not None and hp.importance_sampling_cap is not None:
            weights = truncated_importance_weights(rollout.logprobs[rows], rollout.sampler_logprobs[rows], hp.importance_sampling_cap)
        inputs = {"logprobs": logprobs, "old_logprobs": rollout.logprobs[rows], "advantages": rollout.advantages[rows], "mask": loss_mask,
                  "cliprange_low": hp.cliprange, "cliprange_high": hp.cliprange if hp.cliprange_high is None else hp.cliprange_high,
                  "weights": weights}  # fmt: skip
        result = self.policy_loss(**{name: inputs[name] for name in self.policy_loss_arguments})
        token_losses, pg_stats = checked_policy_loss(result, hp.policy_loss, logprobs.shape)
        weighting = {"aggregation": self.aggregation, "length": hp.response_length}
        loss = aggregate_token_losses(token_losses, loss_mask, **weighting)
        stats = {"loss/policy_avg": loss.detach()}
        stats |= {POLICY_STATS.get(name, f"policy/{name}"): torch.as_tensor(value, device=loss.device).detach()
                  for name, value in pg_stats.items()}  # fmt: skip
        if self.kl_in_loss and self.needs_reference:  # GRPO: k3 (or `kl_loss_estimator`) to the reference, per token
            kl = kl_estimate(logprobs, rollout.ref_logprobs[rows], hp.kl_loss_estimator)  # (n, R)
            loss = loss + hp.kl_coef * aggregate_token_losses(kl, loss_mask, **weighting)
        if hp.entropy_coef:
            entropy = aggregate_token_losses(entropies, loss_mask, **weighting)
            loss = loss - hp.entropy_coef * entropy
            stats["policy/entropy_avg"] = entropy.detach()
        if self.value_model is not None:
            vf_loss, vf_clipfrac = ppo_value_loss(
                self.values(batch, P), rollout.values[rows], rollout.returns[rows], response_mask, hp.cliprange_value
            )  # fmt: skip
            loss = loss + hp.vf_coef * vf_loss
            stats |= {"loss/value_avg": vf_loss.detach(), "val/clipfrac_avg": vf_clipfrac}
        return loss, stats

    def update(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """`ppo_epochs` passes over shuffled minibatches of whole groups, gradients accumulated over micro-batches."""
        hp = self.hparams
        optimizer = self.optimizers()
        N = len(rollout.input_ids)  # B * k rows
        micro_size = self.micro_batch_size(N)
        stats: dict[str, list[torch.Tensor]] = {}
        for _ in range(hp.ppo_epochs):
            for minibatch in group_minibatches(N, hp.num_generations, hp.num_minibatches, self.device):
                micro = minibatch.split(micro_size)
                for i, rows in enumerate(micro):
                    with no_backward_sync(self.trainer, enabled=i < len(micro) - 1):
                        loss, micro_stats = self.micro_batch_loss(rollout, rows)
                        if not self.finite_in_every_process(loss):
                            self.non_finite(f"PPO loss ({loss.item()})")
                            break  # this minibatch's update is skipped
                        self.manual_backward(loss / len(micro))
                    for name, value in micro_stats.items():
                        stats.setdefault(name, []).append(value)
                else:  # every micro-batch had a finite loss (gradients are synced on the last one)
                    if self.gradients_are_finite(optimizer):
                        self.clip_gradients(optimizer, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
                        optimizer.step()
                optimizer.zero_grad()
        self.lr_schedulers().step()
        return {name: torch.stack(values).mean() for name, values in stats.items()}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """One PPO step on a batch of B prompts: rollout and advantages, then the update; skipped (no update) when the
        rollout is not finite in every process."""
        self.stopwatch.seconds.clear()
        sampling_stats = {}
        with self.stopwatch("rollout"):
            rollout = self.rollout(batch)
            if self.hparams.dynamic_sampling_max_rounds:
                rollout, sampling_stats = self.dynamically_sampled(rollout)
            rollout = self.compute_advantages(rollout)
            for key in ("scores", "values", "advantages"):
                value = getattr(rollout, key)
                if value is not None and not self.finite_in_every_process(value):  # no values without a value model
                    return self.non_finite(f"rollout {key}")
        with self.stopwatch("update"):
            update_stats = self.update(rollout)
        self.log_step(batch_idx, rollout, update_stats | sampling_stats)

    def log_step(self, batch_idx: int, rollout: Rollout, update_stats: dict[str, torch.Tensor]) -> None:
        """The step's scalars (`update_stats`, `rollout.step_stats`, `lr`) and, every `sample_every_n_steps` steps, a table
        of the user's prompt / response / score in TensorBoard's Text tab (`samples`)."""
        hp = self.hparams
        stats = update_stats | step_stats(rollout, self.rewards.names, hp.num_generations, hp.ppo_epochs, self.stopwatch.seconds)
        stats["lr"] = torch.tensor(self.lr_schedulers().get_last_lr()[0], device=self.device)
        self.log_stats(stats, "train", batch_size=len(rollout.scores))
        if batch_idx % hp.sample_every_n_steps == 0 and isinstance(self.logger, TensorBoardLogger):
            self.logger.experiment.add_text("samples", samples_table(rollout.prompt_text, rollout, self.decode), self.global_step)

    @torch.no_grad()
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Greedy responses to held-out prompts, scored by the reward sources: `val_objective/scores`."""
        samples = HFRollout(self).sample(batch, 1, self.hparams.response_length, temperature=0.0)
        scores = self.rewards.total(self.rewards(Responses.of(batch, joined(batch, samples, 1), 1, self.decode)))  # (B,)
        self.log_stats({"objective/scores": scores.mean()}, "val", len(scores))

