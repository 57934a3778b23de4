"""PPO for language models, after Huang et al. 2024, "The N+ implementation details of RLHF with PPO",
and the critic-free estimators that share its rollout and clipped update.

One training step reads top to bottom:
    rollout()            sample num_generations responses per prompt (lit_rlhf/rollout_engines.py), score them
                         (lit_rlhf/rewards.py), old log-probs, reference log-probs, values (gae only)
    compute_advantages() per-token KL penalty, then the advantages of `advantage_estimator`
    update()             ppo_epochs passes over minibatches of whole groups: clipped policy loss
                         (+ value loss for gae, + KL loss with kl_in_loss)
then `training_step` logs what the step measured (lit_rlhf/rollout.py `step_stats`). The class is the algorithm; the
flags' records and checks sit above it, the machinery in the modules it imports (rollout.py: chunked forwards, dynamic
sampling's groups, batch-size checks; forward.py: response log-probs; models.py: loading; base.py: what every module shares).
The flags stay flat `__init__` arguments, each with its one-line help (at length: docs/cli.md): jsonargparse would name
the fields of nested dataclass groups `--model.<group>.<field>`, which every config and checkpoint would have to follow.

Multi-turn rollouts (`--model.environment`, `--model.tools`: lit_rlhf/environments.py) hold observation tokens between
the policy's turns: the policy attends to them, but the KL, the score's token, the advantages, values, entropies and
losses count the policy's own tokens only (`Rollout.policy_mask`).

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

from dataclasses import replace
from functools import partial
from typing import Literal, Optional

import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lit_rlhf.base import DEFAULT_MODEL, AlignmentModule
from lit_rlhf.distributed import no_backward_sync
from lit_rlhf.environments import MultiTurn
from lit_rlhf.errors import UserError
from lit_rlhf.estimators import ESTIMATOR_ARGUMENTS, ESTIMATORS, Estimator, checked_estimate, resolved_estimator
from lit_rlhf.forward import response_logps, response_logps_and_entropies, response_values, sequence_scores
from lit_rlhf.losses import ppo_value_loss
from lit_rlhf.models import as_reference, load_causal_lm, load_reward_model, load_tokenizer, load_value_model
from lit_rlhf.ops import KL_ESTIMATORS, group_minibatches, kl_estimate, last_token_index
from lit_rlhf.plugins import hyperparameter_text
from lit_rlhf.policy_losses import POLICY_LOSS_ARGUMENTS, POLICY_LOSSES, aggregate_token_losses, logged_policy_stats, resolved_policy_loss
from lit_rlhf.reward_functions import REWARD_FUNCTIONS
from lit_rlhf.rewards import Responses, reward_sources
from lit_rlhf.rollout import Batch, Rollout, Stopwatch, check_prompt_batches, dynamically_sampled, in_chunks, joined, samples_table, step_stats
from lit_rlhf.rollout_engines import ROLLOUT_ENGINES, HFRollout, MultiTurnRollout, RolloutEngine, resolved_engine, summary
from lit_rlhf.tools import TOOLS

#: the flags of `PPOModule` a resume may change (`AlignmentModule.resume_applies`): sampling, KL, clipping, aggregation, timeouts, engine
RESUME_APPLIES = (
    "response_length", "temperature", "missing_eos_penalty", "estimator_args", "policy_loss_args", "kl_coef", "kl_estimator", "kl_loss_estimator", "kl_in_loss", "gamma", "lam", "ppo_epochs", "cliprange",
    "cliprange_high", "loss_aggregation", "mask_truncated_completions", "entropy_coef", "dynamic_sampling_max_rounds", "cliprange_value", "vf_coef", "max_grad_norm",
    "importance_sampling_cap", "reward_timeout", "reward_errors", "reward_memory_limit", "overlong_max_length", "overlong_buffer_length", "rollout_batch_size", "sample_every_n_steps", "rollout_engine", "vllm_gpu_memory_utilization",
    "max_turns", "max_rollout_tokens", "environment_timeout",
)  # fmt: skip
#: the numeric flags of `PPOModule` and their ranges (`AlignmentModule.flag_ranges`), checked before any model is loaded
FLAG_RANGES = {
    "response_length": "> 0", "temperature": "> 0", "num_generations": "> 0", "kl_coef": ">= 0", "gamma": "in [0, 1]", "lam": "in [0, 1]",
    "ppo_epochs": "> 0", "num_minibatches": "> 0", "gradient_accumulation_steps": "> 0", "rollout_batch_size": "> 0", "cliprange": "> 0",
    "cliprange_high": "> 0", "cliprange_value": "> 0", "vf_coef": ">= 0", "max_grad_norm": "> 0", "sample_every_n_steps": "> 0",
    "importance_sampling_cap": ">= 1", "vllm_gpu_memory_utilization": "in (0, 1]", "entropy_coef": ">= 0",
    "overlong_max_length": "> 0", "overlong_buffer_length": "> 0", "dynamic_sampling_max_rounds": ">= 0", "max_turns": "> 0", "max_rollout_tokens": "> 0",
    "environment_timeout": "> 0",
}  # fmt: skip


def with_table_entries(init):
    """`init` with its docstring's placeholders (ESTIMATOR_NAMES, KL_PLACEMENT, KL_NAMES, POLICY_LOSS_NAMES, POLICY_LOSS_ARGUMENTS,
    ROLLOUT_ENGINE_NAMES, REWARD_NAMES, TOOL_NAMES) replaced by the entries of the tables: what `--help` prints of each flag."""
    names = {
        "ESTIMATOR_NAMES": "; ".join(f"`{name}` ({e.paper}{hyperparameter_text(e.function, ESTIMATOR_ARGUMENTS)})" for name, e in ESTIMATORS.items()),
        "KL_PLACEMENT": "; ".join(f"in the {where} for " + ", ".join(name for name, e in ESTIMATORS.items() if e.kl_in_loss == in_loss)
                                  for where, in_loss in (("reward", False), ("loss", True))),
        "KL_NAMES": "; ".join(f"`{name}` ({paper})" for name, (_, paper) in KL_ESTIMATORS.items()),
        "POLICY_LOSS_NAMES": "; ".join(f"`{name}` ({paper}{hyperparameter_text(f, POLICY_LOSS_ARGUMENTS)})" for name, (f, paper) in POLICY_LOSSES.items()),
        "POLICY_LOSS_ARGUMENTS": ", ".join(POLICY_LOSS_ARGUMENTS),
        "ROLLOUT_ENGINE_NAMES": "; ".join(f"`{name}` ({summary(engine)})" for name, engine in ROLLOUT_ENGINES.items()),
        "REWARD_NAMES": ", ".join(f"`{name}`" for name in REWARD_FUNCTIONS),
        "TOOL_NAMES": ", ".join(f"`{name}`" for name in TOOLS),
    }  # fmt: skip
    for placeholder, text in names.items():
        init.__doc__ = init.__doc__.replace(placeholder, text)
    return init


def check_flags(hp, estimator: Estimator) -> None:
    """Refuse `--model.*` flags (`hp`) that name no KL estimator or contradict each other or the `estimator`'s record,
    before any model is loaded."""
    for flag in ("kl_estimator", "kl_loss_estimator"):
        if hp[flag] not in KL_ESTIMATORS:
            raise UserError(f"--model.{flag} {hp[flag]}: not one of {', '.join(KL_ESTIMATORS)}")
    if hp.dynamic_sampling_max_rounds and not estimator.groups:
        raise UserError(f"--model.dynamic_sampling_max_rounds drops groups whose k responses scored alike: it needs a group"
                        f" estimator (rloo, grpo, dr_grpo), not --model.advantage_estimator {hp.advantage_estimator}")  # fmt: skip
    if estimator.groups and hp.num_generations < 2:
        raise UserError(
            f"--model.advantage_estimator {hp.advantage_estimator} compares the responses to one prompt: it needs"
            f" --model.num_generations 2 or more (e.g. 4), not {hp.num_generations}"
        )
    if hp.reward_model_path is None and not hp.reward_funcs and not hp.environment:
        raise UserError("PPO needs a reward: --model.reward_model_path (a reward model), --model.reward_funcs (functions) and/or --model.environment (its reward)")


class PPOModule(AlignmentModule):
    algorithm = "ppo"
    progress_bar_metrics = ("objective/scores", "objective/kl")
    frozen_modules = ("ref_model", "reward_model")
    resume_applies = AlignmentModule.resume_applies + RESUME_APPLIES
    flag_ranges = AlignmentModule.flag_ranges | FLAG_RANGES

    @with_table_entries
    def __init__(
        self, reward_model_path: Optional[str] = None, model_name_or_path: str = DEFAULT_MODEL, reward_funcs: Optional[list[str]] = None,
        reward_weights: Optional[list[float]] = None, reward_timeout: float = 30.0, reward_errors: Literal["stop", "none"] = "stop", reward_memory_limit: Optional[float] = None,
        overlong_max_length: Optional[int] = None, overlong_buffer_length: Optional[int] = None, value_model_path: Optional[str] = None,
        learning_rate: float = 1e-5, response_length: int = 128, temperature: float = 0.7, missing_eos_penalty: Optional[float] = None,
        advantage_estimator: str = "gae", estimator_args: Optional[dict] = None, num_generations: int = 1, kl_coef: float = 0.05, kl_estimator: str = "k1", kl_loss_estimator: str = "k3",
        kl_in_loss: Optional[bool] = None, gamma: float = 1.0, lam: float = 0.95, ppo_epochs: int = 4, num_minibatches: int = 1, gradient_accumulation_steps: int = 4,
        rollout_batch_size: int = 64, policy_loss: str = "ppo", policy_loss_args: Optional[dict] = None, cliprange: float = 0.2, cliprange_high: Optional[float] = None,
        loss_aggregation: Optional[Literal["token_mean", "sequence_mean", "constant"]] = None, mask_truncated_completions: bool = False,
        entropy_coef: float = 0.0, dynamic_sampling_max_rounds: int = 0, cliprange_value: float = 0.2, vf_coef: float = 0.1, max_grad_norm: float = 1.0,
        sample_every_n_steps: int = 10, rollout_engine: str = "hf", importance_sampling_cap: Optional[float] = 2.0, vllm_gpu_memory_utilization: float = 0.3,
        environment: Optional[str] = None, tools: Optional[list[str]] = None, max_turns: int = MultiTurn.max_turns, max_rollout_tokens: int = MultiTurn.max_rollout_tokens, environment_timeout: float = MultiTurn.environment_timeout, **kwargs,
    ):  # fmt: skip
        """PPO and its critic-free relatives (RLOO, GRPO, Dr. GRPO, REINFORCE++), the estimator a flag (docs/cli.md).

        Args:
            reward_model_path: Frozen reward model folder (e.g. `logs/reward/version_0/hf`), with `gae` the value model's start; optional with `reward_funcs`.
            model_name_or_path: Hub id, local folder or .gguf file of the policy to train.
            reward_funcs: Reward functions, built-ins REWARD_NAMES or `file.py:function` of your own: `f(prompts, completions, **columns) -> list[float | None]`.
            reward_weights: One weight per reward source, the reward model first, then `reward_funcs` in order (default: 1 each).
            reward_timeout: Seconds a reward function may take for one batch; it runs in a worker process.
            reward_errors: What a reward function that hangs or raises does: `stop` the run naming it and the row, or give that call's rows `none` (counted).
            reward_memory_limit: GiB of resident memory the reward worker may use (Linux): a warning past half, the call failed past it. Off if null.
            overlong_max_length: L_max of `soft_overlong_punishment` (DAPO): 0 up to L_max - L_cache, then down to -1 at L_max. null: `response_length`.
            overlong_buffer_length: L_cache of `soft_overlong_punishment`, the tokens before L_max over which the penalty grows. null: a fifth of L_max.
            value_model_path: Where the value model (`gae`) starts. null: the reward model, else the policy's backbone with a new scalar head.
            learning_rate: Peak AdamW learning rate (policy and, with `gae`, value model).
            response_length: Tokens generated per prompt.
            temperature: Sampling temperature of the rollouts (log-probs use the same one).
            missing_eos_penalty: Subtracted from the score of responses with no EOS (off if null).
            advantage_estimator: How each response's tokens are credited: ESTIMATOR_NAMES; or `file.py:function` (or an `Estimator`) of your own.
            estimator_args: Values of the estimator's hyperparameters, its keyword arguments with a default outside the contract, e.g. `{alpha: 0.5}`.
            num_generations: Responses sampled per prompt (k), a group kept in one minibatch and one process; rloo, grpo and dr_grpo need 2 or more.
            kl_coef: Weight of the KL to the reference, a reward penalty or with `kl_in_loss` a loss term. 0: no reference loaded, no `objective/kl`.
            kl_estimator: The per-token KL estimate of the reward penalty and `objective/kl`, from log r = log p - log q: KL_NAMES.
            kl_loss_estimator: The per-token KL estimate of the loss term with `kl_in_loss`, one of the same (`k3`: GRPO's).
            kl_in_loss: false: the KL a per-token reward penalty; true: a `kl_loss_estimator` loss term. null: where the estimator's paper puts it (KL_PLACEMENT).
            gamma: GAE discount (`gae`).
            lam: GAE lambda (`gae`).
            ppo_epochs: Passes over each rollout batch.
            num_minibatches: Optimizer steps per pass: the batch's groups are shuffled and split into this many minibatches.
            gradient_accumulation_steps: Micro-batches per minibatch, gradients accumulated by hand.
            rollout_batch_size: Rows per forward of the rollout's scoring (log-probs, reference log-probs, values, scores); lower it to save memory.
            policy_loss: The policy's loss on each response token: POLICY_LOSS_NAMES; or `file.py:function` of your own, given any of POLICY_LOSS_ARGUMENTS.
            policy_loss_args: Values of the policy loss's hyperparameters, its keyword arguments with a default outside those it is given.
            cliprange: Clip range of the policy ratio, the low side: the ratio is clipped to [1 - cliprange, 1 + cliprange_high].
            cliprange_high: The high side of the clip range (null: `cliprange`); e.g. 0.28 with cliprange 0.2 is DAPO's clip-higher.
            loss_aggregation: How per-token losses become one: `token_mean` (DAPO), `sequence_mean` (GRPO), `constant` (Dr. GRPO). null: the estimator's own.
            mask_truncated_completions: Responses without EOS get no policy (or KL) loss, still scored and in the baselines: DAPO's overlong filtering.
            entropy_coef: Weight of an entropy bonus, the policy's exact per-token entropy aggregated like the policy loss. 0: none computed in the update.
            dynamic_sampling_max_rounds: DAPO's dynamic sampling: groups whose scores are all equal dropped, at most this many more batches sampled. 0: off.
            cliprange_value: Clip range of the value prediction (`gae`).
            vf_coef: Weight of the value loss (`gae`).
            max_grad_norm: Gradient norm clip of each optimizer step.
            sample_every_n_steps: Log a table of prompt / response / score to TensorBoard every N PPO steps.
            rollout_engine: Who samples the rollouts: ROLLOUT_ENGINE_NAMES; or `file.py:Class`, an engine of your own (lit_rlhf/rollout_engines.py).
            importance_sampling_cap: With `vllm`, each token's policy loss is weighted by min(p_trainer / p_vllm, cap). null: no correction.
            vllm_gpu_memory_utilization: Share of the GPU's memory the vLLM engine may take (colocated with training).
            environment: Multi-turn rollouts: `file.py:Class`, an environment that answers each policy turn (lit_rlhf/environments.py); its `reward` a reward source.
            tools: Multi-turn rollouts: functions the policy calls by a tool call in its turn, built-ins TOOL_NAMES or `file.py:function` of your own.
            max_turns: Policy turns per multi-turn rollout, at most (each at most `response_length` tokens).
            max_rollout_tokens: Response tokens per multi-turn rollout, policy turns and observations together, at most.
            environment_timeout: Seconds an environment's or tool's call may take; it runs in a worker process.
        """
        super().__init__(model_name_or_path=model_name_or_path, learning_rate=learning_rate, **kwargs)
        self.estimator, self.estimator_arguments = resolved_estimator(advantage_estimator, estimator_args)
        self.engine_class = resolved_engine(self.hparams)
        self.policy_loss = resolved_policy_loss(policy_loss, policy_loss_args)
        check_flags(self.hparams, self.estimator)
        self.aggregation, self.kl_in_loss = loss_aggregation or self.estimator.aggregation, self.estimator.kl_in_loss if kl_in_loss is None else kl_in_loss
        self.needs_reference = kl_coef > 0  # a reference is loaded and scored for a KL only; with LoRA it is the policy, adapter disabled
        self.reward_functions, self.rewards = reward_sources(self.hparams, self.reward_model_scores)  # the reward model, functions, environment
        self.automatic_optimization = False
        self.tokenizer = load_tokenizer(model_name_or_path, self.hparams.trust_remote_code)
        self.decode = partial(self.tokenizer.decode, skip_special_tokens=True)  # a response's ids as text: what reward functions read
        self.model, load_args = self.load_trained_model(), self.load_args()
        self.ref_model = load_causal_lm(model_name_or_path, **load_args).requires_grad_(False) if self.needs_reference and not self.hparams.lora_r else None
        self.reward_model = load_reward_model(reward_model_path, self.tokenizer, **load_args) if reward_model_path else None
        critic = "values" in self.estimator_arguments  # gae; the others have no value weights to train, optimise or checkpoint
        self.value_model = load_value_model(value_model_path, reward_model_path, model_name_or_path, self.tokenizer, self.lora_args(), **load_args) if critic else None
        self.trained_modules = ("model", "value_model") if critic else ("model",)
        self.engine: Optional[RolloutEngine] = None  # started by `started_engine`
        self.stopwatch = Stopwatch()  # the wall time of each phase of the step, for `time/*`

    def setup(self, stage: str) -> None:
        check_prompt_batches(self.trainer.datamodule, stage, self.hparams.num_generations, self.hparams.num_minibatches, self.hparams.gradient_accumulation_steps)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.trainer.world_size > 1:  # the same seed on every process would sample alike: offset it by rank
            torch.manual_seed(int(torch.randint(2**62, ())) + self.global_rank)
        self.started_engine()  # here, so that vLLM's start-up is not a rollout's time

    def started_engine(self) -> RolloutEngine:
        """The engine of `--model.rollout_engine` (lit_rlhf/rollout_engines.py), started on first use."""
        self.engine = self.engine or self.engine_class(self)
        return self.engine

    def score(self, batch: Batch, context_length: int) -> torch.Tensor:
        """Reward-model score of each prompt + response, read at its last real token. -> (B,)"""
        return sequence_scores(self.reward_model, batch)

    def reward_model_scores(self, batch: Batch, context_length: int) -> torch.Tensor:
        """The reward source `reward_model`: `score`, `rollout_batch_size` rows per forward. -> (N,)"""
        return in_chunks(self.score, batch, context_length, self.hparams.rollout_batch_size)

    def teardown(self, stage: str) -> None:
        self.reward_functions.close()

    # ---- the step: rollout -> advantages -> update ------------------------------------------

    @torch.no_grad()
    def rollout(self, batch: Batch) -> Rollout:
        """Sample `num_generations` responses per prompt with the rollout engine, score them with the reward sources,
        then old log-probs, reference log-probs and (with a value model) values, `rollout_batch_size` rows per forward."""
        hp, k, engine = self.hparams, self.hparams.num_generations, self.started_engine()
        with self.stopwatch("generation"):
            engine.sync(self.model)
            samples = engine.sample(batch, k, hp.response_length, hp.temperature)  # (B * k, R), groups contiguous
        answered = joined(batch, samples, k)  # input_ids, attention_mask, labels: (B * k, P + R)
        responses = Responses.of(batch, answered, k, self.decode, samples.environment_rewards)
        source_scores = self.rewards(responses)  # (B * k, F)
        scores = self.rewards.total(source_scores)
        if hp.missing_eos_penalty is not None:
            scores = scores - hp.missing_eos_penalty * (~samples.contains_eos).float()
        chunked = partial(in_chunks, batch=answered, context_length=batch["input_ids"].shape[1], chunk_rows=hp.rollout_batch_size)
        logprobs, entropies = chunked(partial(response_logps_and_entropies, self.model, temperature=hp.temperature)).unbind(-1)
        ref_logprobs = None
        if self.needs_reference:
            with as_reference(self.model, self.ref_model) as reference:
                ref_logprobs = chunked(partial(response_logps, reference, temperature=hp.temperature))
        values = chunked(partial(response_values, self.value_model)) if self.value_model is not None else None
        return Rollout.of(answered, samples, responses.prompts, logprobs=logprobs, entropies=entropies, ref_logprobs=ref_logprobs, scores=scores,
                          values=values, source_scores=source_scores)  # fmt: skip

    def dynamically_sampled(self, rollout: Rollout) -> tuple[Rollout, dict[str, torch.Tensor]]:
        """DAPO's dynamic sampling (`rollout.dynamically_sampled`): more rollouts of the training loader's next batches, till none is left."""
        more = (self.rollout(self.transfer_batch_to_device(batch, self.device, 0)) for batch in iter(self.trainer.train_dataloader.next_batch, None))
        return dynamically_sampled(rollout, self.hparams.num_generations, self.hparams.dynamic_sampling_max_rounds, more, self.sum_over_processes)

    @torch.no_grad()
    def compute_advantages(self, rollout: Rollout) -> Rollout:
        """The per-token rewards, the KL penalty `-kl_coef * KL_t` (none with `kl_in_loss`) plus the score on the policy's
        last token, then the estimator's advantages (N, R) (and returns, the value targets), on the policy's tokens only."""
        hp = self.hparams
        policy_mask = rollout.policy_mask  # (N, R), N = B * k: observation tokens (multi-turn) get no KL, reward or advantage
        kl = kl_estimate(rollout.logprobs, rollout.ref_logprobs, hp.kl_estimator) * policy_mask if self.needs_reference else None
        non_score_reward = -hp.kl_coef * kl if self.needs_reference else torch.zeros_like(policy_mask)  # (N, R)
        rewards = torch.zeros_like(policy_mask) if self.kl_in_loss else non_score_reward.clone()
        last = last_token_index(policy_mask)  # (N,) index of the policy's last token
        rewards[torch.arange(len(last)), last] += rollout.scores
        inputs = {"rewards": rewards, "mask": policy_mask, "values": rollout.values, "k": hp.num_generations,
                  "gamma": hp.gamma, "lam": hp.lam, "sum_over_processes": self.sum_over_processes}  # fmt: skip
        estimate = self.estimator.function(**{name: inputs[name] for name in self.estimator_arguments})
        advantages, returns = checked_estimate(estimate, hp.advantage_estimator, rewards.shape)
        return replace(rollout, kl=kl, non_score_reward=non_score_reward, advantages=advantages, returns=returns)

    def micro_batch_loss(self, rollout: Rollout, rows: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The loss of rollout `rows` and its statistics: policy loss (aggregated by `loss_aggregation`) + KL loss (`kl_in_loss`)
        - entropy bonus (`entropy_coef`) + value loss (gae), over the policy's tokens; `mask_truncated_completions` leaves responses without EOS out of the first three."""
        hp = self.hparams
        batch, P = rollout.model_inputs(rows), rollout.context_length
        policy_mask = rollout.policy_mask[rows]  # (n, R)
        loss_mask = policy_mask * rollout.contains_eos[rows, None] if hp.mask_truncated_completions else policy_mask
        if hp.entropy_coef:
            logprobs, entropies = response_logps_and_entropies(self.model, batch, P, hp.temperature).unbind(-1)  # (n, R) each
        else:
            logprobs = response_logps(self.model, batch, P, hp.temperature)  # (n, R)
        token_losses, pg_stats = self.policy_loss(  # the arguments it declares: `policy_losses.POLICY_LOSS_ARGUMENTS`
            logprobs=logprobs, old_logprobs=rollout.logprobs[rows], advantages=rollout.advantages[rows], mask=loss_mask, cliprange_low=hp.cliprange,
            cliprange_high=hp.cliprange if hp.cliprange_high is None else hp.cliprange_high, weights=rollout.importance_weights(rows, hp.importance_sampling_cap),
        )  # fmt: skip
        weighting = {"aggregation": self.aggregation, "length": hp.response_length}
        loss = aggregate_token_losses(token_losses, loss_mask, **weighting)
        stats = {"loss/policy_avg": loss.detach()} | logged_policy_stats(pg_stats, loss.device)
        if self.kl_in_loss and self.needs_reference:  # GRPO: k3 (or `kl_loss_estimator`) to the reference, per token
            kl = kl_estimate(logprobs, rollout.ref_logprobs[rows], hp.kl_loss_estimator)  # (n, R)
            loss = loss + hp.kl_coef * aggregate_token_losses(kl, loss_mask, **weighting)
        if hp.entropy_coef:
            entropy = aggregate_token_losses(entropies, loss_mask, **weighting)
            loss = loss - hp.entropy_coef * entropy
            stats["policy/entropy_avg"] = entropy.detach()
        if self.value_model is not None:
            values = response_values(self.value_model, batch, P)  # (n, R)
            vf_loss, vf_clipfrac = ppo_value_loss(values, rollout.values[rows], rollout.returns[rows], policy_mask, hp.cliprange_value)
            loss = loss + hp.vf_coef * vf_loss
            stats |= {"loss/value_avg": vf_loss.detach(), "val/clipfrac_avg": vf_clipfrac}
        return loss, stats

    def update(self, rollout: Rollout) -> dict[str, torch.Tensor]:
        """`ppo_epochs` passes over shuffled minibatches of whole groups, gradients accumulated over micro-batches."""
        hp, optimizer = self.hparams, self.optimizers()
        N = len(rollout.input_ids)  # B * k rows
        micro_size, stats = max(1, N // (hp.num_minibatches * hp.gradient_accumulation_steps)), {}  # rows per forward/backward; name -> values
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
                    for name, norm in self.clipped_step(optimizer, hp.max_grad_norm).items():
                        stats.setdefault(name, []).append(norm)
                optimizer.zero_grad()
        self.lr_schedulers().step()
        return {name: torch.stack(values).mean() for name, values in stats.items()}

    def training_step(self, batch: Batch, batch_idx: int) -> None:
        """One PPO step on a batch of B prompts: rollout and advantages, then the update (none when the rollout is not finite
        in every process); its scalars logged, and every `sample_every_n_steps` steps a `samples` table in TensorBoard."""
        hp, sampling_stats = self.hparams, {}
        self.stopwatch.seconds.clear()
        with self.stopwatch("rollout"):
            rollout = self.rollout(batch)
            if hp.dynamic_sampling_max_rounds:
                rollout, sampling_stats = self.dynamically_sampled(rollout)
            rollout = self.compute_advantages(rollout)
            for key in ("scores", "values", "advantages"):
                value = getattr(rollout, key)
                if value is not None and not self.finite_in_every_process(value):  # no values without a value model
                    return self.non_finite(f"rollout {key}")
        with self.stopwatch("update"):
            stats = self.update(rollout) | sampling_stats
        stats |= step_stats(rollout, self.rewards.names, hp.num_generations, hp.ppo_epochs, self.stopwatch.seconds)
        stats["lr"] = torch.tensor(self.lr_schedulers().get_last_lr()[0], device=self.device)
        self.log_stats(stats, "train", batch_size=len(rollout.scores))
        if batch_idx % hp.sample_every_n_steps == 0 and isinstance(self.logger, TensorBoardLogger):
            self.logger.experiment.add_text("samples", samples_table(rollout.prompt_text, rollout, self.decode), self.global_step)

    @torch.no_grad()
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        """Greedy responses (conversations, with an environment or tools) to held-out prompts, scored by the reward sources: `val_objective/scores`."""
        samples = (MultiTurnRollout if issubclass(self.engine_class, MultiTurnRollout) else HFRollout)(self).sample(batch, 1, self.hparams.response_length, 0.0)
        scores = self.rewards.total(self.rewards(Responses.of(batch, joined(batch, samples, 1), 1, self.decode, samples.environment_rewards)))  # (B,)
        self.log_stats({"objective/scores": scores.mean()}, "val", len(scores))
