"""PPO module and its advantage estimators: the first update is on-policy, EOS handling, groups, a toy task
each estimator must learn, resume, flag checks."""

import sys
import types
from dataclasses import replace

import pytest
import torch

from lit_rlhf.cli import cli
from conftest import first_prompt_batch, fit_args
from lit_rlhf.errors import UserError
from lit_rlhf.estimators import ESTIMATORS
from lit_rlhf.policy_losses import POLICY_LOSSES
from lit_rlhf.rows import load_rows
from lit_rlhf.ops import masked_mean
from lit_rlhf.ppo import PPOModule
from lit_rlhf.rollout_engines import HFRollout


def ppo_args(model_dir, reward_dir, dataset, *extra):
    """Without the word `fit`. `reward_dir` None: no reward model (reward functions or an environment score)."""
    reward = [] if reward_dir is None else ["--model.reward_model_path", str(reward_dir)]
    return fit_args("lit_rlhf.ppo.PPOModule", model_dir, dataset, *reward, "--model.response_length", "8", "--data.mode", "prompts",
                    "--data.val_size", "4", "--data.batch_size", "8", "--trainer.limit_val_batches", "0", "--trainer.max_epochs", "1",
                    *extra)  # fmt: skip


def estimator_args(estimator: str, num_generations: int = 2) -> list[str]:
    """The flags of `estimator`; the group estimators sample `num_generations` responses per prompt. The KL goes
    where the estimator's record puts it (`--model.kl_in_loss` unset)."""
    group = ["--model.num_generations", str(num_generations)] if ESTIMATORS[estimator].groups else []
    return ["--model.advantage_estimator", estimator, *group]


def spy_policy_loss(monkeypatch, name: str = "ppo") -> list:
    """The (losses, stats) of every call of the policy loss `name`, in order (a module built afterwards calls the spy)."""
    calls = []
    function, paper = POLICY_LOSSES[name]
    monkeypatch.setitem(POLICY_LOSSES, name, (lambda **k: calls.append(function(**k)) or calls[-1], paper))
    return calls


@pytest.fixture(scope="module")
def prompt_batch(tiny_model_dir, real_rows):
    return first_prompt_batch(tiny_model_dir, real_rows, batch_size=8)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_rollout_starts_with_zero_kl_and_penalises_missing_eos(tiny_model_dir, tiny_reward_dir, prompt_batch, lora_r):
    module = PPOModule(reward_model_path=tiny_reward_dir, model_name_or_path=tiny_model_dir, response_length=8,
                       missing_eos_penalty=2.0, lora_r=lora_r)  # fmt: skip
    module.score = types.MethodType(lambda self, batch, P: torch.zeros(len(batch["input_ids"])), module)
    torch.manual_seed(0)
    rollout = module.compute_advantages(module.rollout(prompt_batch))
    assert (module.ref_model is None) == bool(lora_r)
    assert torch.equal(rollout.kl, torch.zeros_like(rollout.kl))  # policy == reference
    assert torch.equal(rollout.scores, -2.0 * (~rollout.contains_eos).float())
    assert (~rollout.contains_eos).any()  # 8 random tokens rarely end in EOS: the penalty is exercised
    responses = rollout.input_ids[:, prompt_batch["input_ids"].shape[1] :]
    assert ((responses == module.tokenizer.pad_token_id) | rollout.response_mask.bool()).all()
    scored = rollout.labels != -100  # exactly the response tokens up to the first EOS
    assert torch.equal(scored, torch.cat([torch.zeros_like(prompt_batch["input_ids"]), rollout.response_mask], 1).bool())


def test_rollout_scoring_does_not_depend_on_its_batch_size(tiny_model_dir, tiny_reward_dir, prompt_batch):
    module = PPOModule(reward_model_path=tiny_reward_dir, model_name_or_path=tiny_model_dir, response_length=8)
    rollouts = []
    for size in (64, 3, 1):  # one forward of all 8 rows; 3 + 3 + 2; one row at a time
        module.hparams.rollout_batch_size = size
        torch.manual_seed(0)  # the same samples
        rollouts.append(module.rollout(prompt_batch))
    for rollout in rollouts[1:]:
        assert torch.equal(rollout.input_ids, rollouts[0].input_ids)
        for key in ("logprobs", "ref_logprobs", "values", "scores"):
            assert torch.allclose(getattr(rollout, key), getattr(rollouts[0], key), atol=1e-5), key
    assert not torch.equal(rollouts[0].logprobs, torch.zeros_like(rollouts[0].logprobs))


def test_rollout_samples_each_prompt_k_times_in_a_contiguous_group(tiny_model_dir, tiny_reward_dir, prompt_batch):
    module = PPOModule(reward_model_path=tiny_reward_dir, model_name_or_path=tiny_model_dir, response_length=8,
                       advantage_estimator="rloo", num_generations=3)  # fmt: skip
    assert module.value_model is None and module.trained_modules == ("model",)
    torch.manual_seed(0)
    rollout = module.compute_advantages(module.rollout(prompt_batch))
    P = prompt_batch["input_ids"].shape[1]
    assert torch.equal(rollout.input_ids[:, :P], prompt_batch["input_ids"].repeat_interleave(3, 0))  # (8 * 3, P)
    assert rollout.values is None and rollout.returns is None
    responses = rollout.input_ids[:, P:].view(8, 3, -1)
    assert any(not torch.equal(group[0], group[1]) for group in responses)  # the k samples of a prompt differ
    # one advantage per response, on each of its tokens; RLOO's advantages of a group sum to 0
    advantages = rollout.advantages  # (24, R)
    assert torch.equal(advantages, advantages[:, :1] * rollout.response_mask)
    assert torch.allclose(advantages[:, 0].view(8, 3).sum(1), torch.zeros(8), atol=1e-5)


@pytest.mark.parametrize("estimator, kl_in_loss, in_loss", [
    ("grpo", None, True), ("dr_grpo", None, True), ("rloo", None, False), ("grpo", False, False), ("rloo", True, True),
])  # fmt: skip
def test_the_kl_goes_where_the_estimators_paper_puts_it_unless_the_flag_says(tiny_model_dir, tiny_reward_dir, prompt_batch,
                                                                             estimator, kl_in_loss, in_loss):  # fmt: skip
    """GRPO and Dr. GRPO put the KL in the loss, the others in the reward: only there does a reference that rates
    each response differently change the advantages."""
    module = PPOModule(reward_model_path=tiny_reward_dir, model_name_or_path=tiny_model_dir, response_length=8,
                       advantage_estimator=estimator, num_generations=2, kl_in_loss=kl_in_loss)  # fmt: skip
    torch.manual_seed(0)
    rollout = module.rollout(prompt_batch)
    shift = torch.arange(len(rollout.logprobs))[:, None] * rollout.response_mask  # (N, R): response i is i nats per token less likely
    farther = replace(rollout, ref_logprobs=rollout.ref_logprobs - shift)
    same = torch.equal(module.compute_advantages(rollout).advantages, module.compute_advantages(farther).advantages)
    assert module.kl_in_loss == in_loss and same == in_loss


@pytest.mark.parametrize(
    "estimator, checkpointing, precision",
    [("gae", "false", "32-true"), ("gae", "true", "32-true"), ("gae", "false", "bf16-mixed"), ("rloo", "true", "32-true"),
     ("grpo", "false", "bf16-mixed"), ("dr_grpo", "false", "32-true"), ("reinforce_pp", "false", "32-true")],
)  # fmt: skip
def test_first_minibatch_of_first_update_is_on_policy(
    tiny_model_dir, tiny_reward_dir, real_rows, tmp_path, monkeypatch, estimator, checkpointing, precision
):
    monkeypatch.chdir(tmp_path)
    calls = spy_policy_loss(monkeypatch)
    run = cli(["fit", *ppo_args(tiny_model_dir, tiny_reward_dir, real_rows, "--data.limit", "12", "--model.ppo_epochs", "2",
               "--model.gradient_accumulation_steps", "2", "--model.learning_rate", "1e-2", "--trainer.limit_train_batches", "1",
               "--model.gradient_checkpointing", checkpointing, "--trainer.precision", precision, *estimator_args(estimator))])  # fmt: skip
    assert run.trainer.precision == precision
    assert run.trainer.callback_metrics["objective/kl"] == 0.0
    times = {k: run.trainer.callback_metrics[f"time/{k}"].item() for k in ("generation", "rollout", "update")}
    assert 0 < times["generation"] < times["rollout"] and times["update"] > 0  # rollout = generation + scoring
    updated_tokens = run.trainer.callback_metrics["time/update_tokens_per_s"].item() * times["update"] / 2  # 2 epochs
    assert updated_tokens == pytest.approx(round(updated_tokens), abs=0.05) and updated_tokens >= 12  # a count, >= 1 per row
    # critic-free estimators hold no value model: nothing loaded, optimised or logged for it
    critic = estimator == "gae"
    assert (run.model.value_model is not None) == critic and ("loss/value_avg" in run.trainer.callback_metrics) == critic
    optimised = sum(p.numel() for group in run.trainer.optimizers[0].param_groups for p in group["params"])
    assert (optimised == sum(p.numel() for p in run.model.model.parameters())) != critic
    _, first = calls[0]
    assert first["ratio"].item() == pytest.approx(1.0, abs=1e-6) and first["approxkl"].item() < 1e-10
    assert first["clipfrac"] == 0.0
    _, later = calls[-1]  # second epoch, after an optimizer step with a large learning rate
    assert abs(later["ratio"].item() - 1.0) > 1e-4
    assert run.trainer.global_step == 2  # ppo_epochs x num_minibatches optimizer steps


def ascii_share_score(scores: list[float]):
    """A reward-model `score` method: the share of response tokens that are ASCII bytes (ids < 128), each
    batch's mean appended to `scores`."""

    def score(self, batch, context_length):
        response, response_mask = batch["input_ids"][:, context_length:], batch["attention_mask"][:, context_length:]
        share = ((response < 128) * response_mask).sum(1) / response_mask.sum(1)
        scores.append(share.mean().item())
        return share

    return score


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_toy_reward_is_learned(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path, monkeypatch, estimator):
    """Reward = share of response tokens that are ASCII bytes (ids < 128): about 0.5 at random init.
    Every estimator rolls out 16 responses per step: 16 prompts, or 4 prompts x 4 samples."""
    monkeypatch.chdir(tmp_path)
    prompts = "4" if ESTIMATORS[estimator].groups else "16"
    run = cli(ppo_args(tiny_model_dir, tiny_reward_dir, real_rows, "--data.limit", "164", "--data.batch_size", prompts,
                       "--model.learning_rate", "1e-2", "--model.kl_coef", "0.01", "--model.temperature", "1.0",
                       "--model.gradient_accumulation_steps", "1", "--model.ppo_epochs", "4", "--seed_everything", "0",
                       "--trainer.limit_train_batches", "10", *estimator_args(estimator, num_generations=4)), run=False)  # fmt: skip
    scores = []
    run.model.score = types.MethodType(ascii_share_score(scores), run.model)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert len(scores) == 10
    assert sum(scores[-2:]) / 2 > sum(scores[:2]) / 2 + 0.15, scores
    norms = {name: value for name, value in run.trainer.logged_metrics.items() if name.startswith("grad_norm/")}  # before clipping
    assert set(norms) == {f"grad_norm/{name}" for name in run.model.trained_modules} and all(value > 0 for value in norms.values())


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_resume_from_a_mid_run_checkpoint(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path, monkeypatch, estimator):
    monkeypatch.chdir(tmp_path)
    args = ["fit", *ppo_args(tiny_model_dir, tiny_reward_dir, real_rows, "--data.limit", "36", "--model.ppo_epochs", "1",
            "--model.gradient_accumulation_steps", "1", "--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "-1")]  # fmt: skip
    cli([*args, *estimator_args(estimator), "--trainer.max_steps", "2"])  # interrupted after 2 of 4 PPO steps
    ckpt = tmp_path / "logs/ppo/version_0/checkpoints/epoch=0-step=1.ckpt"
    state = torch.load(ckpt, weights_only=False)
    assert not any(k.startswith(("ref_model.", "reward_model.")) for k in state["state_dict"])
    assert any(k.startswith("model.") for k in state["state_dict"])
    assert any(k.startswith("value_model.") for k in state["state_dict"]) == (estimator == "gae")  # critic-free: no value weights
    resumed = cli([*args, *estimator_args(estimator), "--ckpt_path", str(ckpt)])  # the command that started the run, resumed
    assert resumed.model.hparams.advantage_estimator == estimator
    assert resumed.trainer.global_step == 4
    assert resumed.model.lr_schedulers().last_epoch == 4  # the scheduler was restored, then stepped 3 more times


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "dr_grpo"])
def test_group_estimators_refuse_one_response_per_prompt(estimator):
    with pytest.raises(UserError, match=f"--model.advantage_estimator {estimator} compares the responses to one prompt: it needs"
                                        " --model.num_generations 2 or more"):  # fmt: skip
        PPOModule(reward_model_path="unused", model_name_or_path="unused", advantage_estimator=estimator)  # before any model loads


def test_a_batch_that_does_not_split_into_whole_groups_is_refused(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # 6 prompts x 2 responses: 6 groups do not split into 4 minibatches; batch 4 or 8 would (8 rows per micro-batch step)
    args = ppo_args(tiny_model_dir, tiny_reward_dir, real_rows, "--data.limit", "12", "--data.batch_size", "6", "--model.num_minibatches", "4",
                    "--model.gradient_accumulation_steps", "1", *estimator_args("rloo"))  # fmt: skip
    with pytest.raises(UserError, match=r"--data.batch_size 6 prompts x --model.num_generations 2 responses do not split into"
                                        r" --model.num_minibatches 4 minibatches .* use a batch size that is a multiple of 4"):  # fmt: skip
        cli(["fit", *args])


def test_sample_table_shows_the_users_prompt(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    cli(["fit", *ppo_args(tiny_model_dir, tiny_reward_dir, real_rows, "--data.limit", "12", "--model.ppo_epochs", "1",
         "--trainer.limit_train_batches", "1")])  # fmt: skip
    events = EventAccumulator(str(tmp_path / "logs/ppo/version_0"), size_guidance={"tensors": 0}).Reload()
    table = events.Tensors("samples/text_summary")[0].tensor_proto.string_val[0].decode()
    user_prompts = {row["prompt"].replace("\n", " ").replace("|", "\\|") for _, row in load_rows(str(real_rows))[:12]}
    first_cells = [line.split(" | ")[0].removeprefix("| ") for line in table.split("\n")[2:]]
    assert len(first_cells) == 8 and set(first_cells) <= user_prompts  # no chat template, no system turn


def test_the_hf_engine_keeps_processes_in_step_only_when_parameters_are_sharded(tiny_model_dir, tiny_reward_dir, prompt_batch, monkeypatch):
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    module = PPOModule(reward_model_path=tiny_reward_dir, model_name_or_path=tiny_model_dir, response_length=2)
    engine = module.started_engine()
    assert isinstance(engine, HFRollout)
    synced = []

    def generate(input_ids, synced_gpus, **kwargs):  # one response token per prompt, no collective
        synced.append(synced_gpus)
        return torch.cat([input_ids, input_ids[:, -1:]], 1)

    monkeypatch.setattr(module.model, "generate", generate)
    for strategy in (None, DDPStrategy(), FSDPStrategy()):  # no trainer, replicated, sharded parameters
        module._trainer = None if strategy is None else types.SimpleNamespace(strategy=strategy)
        samples = engine.sample(prompt_batch, 2, 2, temperature=0.7)
        assert samples.responses.shape[0] == 2 * len(prompt_batch["input_ids"]) and samples.sampler_logprobs is None
    # replicated parameters: the decode loop of lit_rlhf/generation.py, no collective; sharded: model.generate with
    # synced_gpus, which keeps every process stepping until all are done
    assert synced == [True]


ENGINE_PLUGIN = """
import torch

from lit_rlhf.rollout_engines import Samples


class EchoEngine:
    \"\"\"Answers each prompt with its own last 3 tokens and EOS, and says each had log-prob 0: no model at all.\"\"\"

    synced = []

    def __init__(self, module):
        self.eos = module.tokenizer.eos_token_id

    def sync(self, policy):
        EchoEngine.synced.append(policy)

    def sample(self, prompts, k, max_new_tokens, temperature):
        echo = prompts["input_ids"][:, -3:].repeat_interleave(k, 0)  # (B * k, 3)
        responses = torch.cat([echo, torch.full_like(echo[:, :1], self.eos)], 1)  # (B * k, 4)
        return Samples(responses, torch.ones_like(responses), torch.ones(len(responses), dtype=torch.bool), torch.zeros(responses.shape))
"""


@pytest.mark.parametrize("spec", ["echo", "my_engines.py:EchoEngine"])
def test_a_rollout_engine_of_ones_own_is_one_class(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path, monkeypatch, spec):
    """A third engine is one class: registered in the table, or named by its import path."""
    from lit_rlhf.plugins import import_function
    from lit_rlhf.rollout_engines import ROLLOUT_ENGINES

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_engines.py").write_text(ENGINE_PLUGIN)
    monkeypatch.setitem(ROLLOUT_ENGINES, "echo", import_function("my_engines.py:EchoEngine", "test"))
    run = cli(ppo_args(tiny_model_dir, tiny_reward_dir, real_rows, "--data.limit", "12", "--model.ppo_epochs", "1",
                       "--model.gradient_accumulation_steps", "1", "--trainer.limit_train_batches", "1", "--model.rollout_engine", spec,
                       *estimator_args("grpo")), run=False)  # fmt: skip
    rollouts = []
    rollout = run.model.rollout
    run.model.rollout = lambda batch: rollouts.append((batch, rollout(batch))) or rollouts[-1][1]
    run.trainer.fit(run.model, datamodule=run.datamodule)
    [(batch, sampled)] = rollouts
    assert run.model.engine_class.synced == [run.model.model]  # pushed once, before its one rollout
    P = batch["input_ids"].shape[1]
    assert torch.equal(sampled.input_ids[:, P : P + 3], batch["input_ids"][:, -3:].repeat_interleave(2, 0))  # 8 prompts x 2, echoed
    metrics = run.trainer.callback_metrics
    assert metrics["objective/eos_share"] == 1.0 and run.trainer.global_step == 1
    # the trainer's own log-probs of the echoes, which the engine said were 0
    assert metrics["rollout/logprob_diff"] == pytest.approx(-masked_mean(sampled.logprobs, sampled.response_mask).item())


def test_step_stats_by_hand():
    """Two responses of one prompt (k = 2): R = 2 tokens, the second response ends at its first token."""
    from lit_rlhf.rollout import Rollout, step_stats

    response_mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    rollout = Rollout(
        input_ids=torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0]]),
        labels=torch.zeros(2, 5, dtype=torch.long), response_mask=response_mask, contains_eos=torch.tensor([False, True]),
        logprobs=torch.tensor([[-1.0, -2.0], [-0.5, 0.0]]), entropies=torch.tensor([[0.5, 1.0], [2.0, 9.0]]), ref_logprobs=None,
        scores=torch.tensor([1.0, 3.0]),
        source_scores=torch.tensor([[1.0], [3.0]]), sampler_logprobs=torch.tensor([[-1.5, -2.0], [-0.5, 0.0]]),
        kl=torch.tensor([[0.2, 0.4], [0.2, 0.0]]), non_score_reward=torch.tensor([[-0.02, -0.04], [-0.02, 0.0]]),
    )  # fmt: skip
    stats = step_stats(rollout, ["reward_model"], k=2, ppo_epochs=3, seconds={"generation": 0.5, "rollout": 1.0, "update": 7.0})
    expected = {
        "objective/kl": 0.4, "objective/non_score_reward": -0.04, "objective/rlhf_reward": 1.96,
        "objective/entropy": 1.75, "objective/entropy_per_token": 3.5 / 3,  # (0.5 + 1, 2) over responses, 3.5 over 3 tokens
        "objective/scores": 2.0, "objective/eos_share": 0.5, "rewards/total": 2.0, "rewards/reward_model/mean": 2.0,
        "rewards/flat_group_share": 0.0, "rollout/logprob_diff": 0.5 / 3, "time/generation": 0.5, "time/rollout": 1.0,
        "time/update": 7.0, "time/generated_tokens_per_s": 3 / 0.5, "time/update_tokens_per_s": 3 * 7 / 7.0,
    }  # fmt: skip
    assert {name: pytest.approx(float(stats[name])) for name in expected} == expected
    assert "objective/kl" not in step_stats(replace(rollout, kl=None), ["reward_model"], 2, 3, {"generation": 1, "rollout": 1, "update": 1})


def test_help_names_every_rollout_engine_with_its_summary():
    from lit_rlhf.rollout_engines import ROLLOUT_ENGINES, summary

    assert [name for name in ROLLOUT_ENGINES if f"`{name}` ({summary(ROLLOUT_ENGINES[name])})" in PPOModule.__init__.__doc__] == ["hf", "vllm", "multi_turn", "multi_turn_vllm"]
    assert "ROLLOUT_ENGINE_NAMES" not in PPOModule.__init__.__doc__


ESTIMATOR_PLUGIN = """
import torch

from lit_rlhf.estimators import Estimator


def sign_of_score(rewards, mask):
    \"\"\"+1 on every token of a response whose total reward is positive, -1 otherwise: no critic, no groups.\"\"\"
    return torch.sign((rewards * mask).sum(1, keepdim=True)) * mask, None


def group_median(rewards, mask, k):
    groups = (rewards * mask).sum(1).view(-1, k)  # (B, k)
    return (groups - groups.median(1, keepdim=True).values).flatten()[:, None] * mask, None


median_baseline = Estimator(group_median, "a median baseline", groups=True, aggregation="sequence_mean")


def needs_a_critic(rewards, mask, values, discount):
    return rewards, None
"""


@pytest.mark.parametrize("spec", ["my_estimators:sign_of_score", "my_estimators.py:median_baseline"])
def test_an_estimator_from_the_users_own_file_trains_by_flag(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "my_estimators", raising=False)
    (tmp_path / "my_estimators.py").write_text(ESTIMATOR_PLUGIN)
    groups = spec.endswith("median_baseline")
    run = cli(["fit", *ppo_args(tiny_model_dir, tiny_reward_dir, real_rows, "--data.limit", "12", "--model.ppo_epochs", "1",
               "--model.gradient_accumulation_steps", "1", "--trainer.limit_train_batches", "1", "--model.advantage_estimator", spec,
               *(["--model.num_generations", "2", "--data.batch_size", "4"] if groups else []))])  # fmt: skip
    assert run.trainer.global_step == 1 and run.model.value_model is None  # neither declares values
    assert run.model.estimator.groups == groups and run.model.estimator.aggregation == ("sequence_mean" if groups else "token_mean")
    assert run.trainer.callback_metrics["objective/kl"] == 0.0


def test_an_estimator_plugin_is_checked_against_the_contract(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_estimators.py").write_text(ESTIMATOR_PLUGIN)
    with pytest.raises(UserError, match=r"--model.advantage_estimator: needs_a_critic\(rewards, mask, values, discount\) requires discount,"
                                        r" which is not provided; an advantage estimator is called with any of the keyword arguments"
                                        r" rewards, mask, values, k, gamma, lam, sum_over_processes"):  # fmt: skip
        PPOModule(reward_model_path="unused", model_name_or_path="unused", advantage_estimator="my_estimators.py:needs_a_critic")
    with pytest.raises(UserError, match="compares the responses to one prompt: it needs --model.num_generations 2 or more"):
        PPOModule(reward_model_path="unused", model_name_or_path="unused", advantage_estimator="my_estimators.py:median_baseline")


@pytest.mark.parametrize("policy_loss, flags", [
    ("gspo", []),
    ("cispo", ["--model.cliprange_high", "0.28", "--model.loss_aggregation", "token_mean", "--model.kl_coef", "0"]),
])  # fmt: skip
def test_gspo_and_cispo_fit_and_their_first_minibatch_is_on_policy(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path, monkeypatch,
                                                                  policy_loss, flags):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    calls = spy_policy_loss(monkeypatch, policy_loss)
    run = cli(["fit", *ppo_args(tiny_model_dir, tiny_reward_dir, real_rows, "--data.limit", "12", "--data.batch_size", "4",
               "--model.ppo_epochs", "2", "--model.gradient_accumulation_steps", "2", "--model.learning_rate", "1e-2",
               "--trainer.limit_train_batches", "1", "--model.policy_loss", policy_loss, *estimator_args("grpo"), *flags)])  # fmt: skip
    metrics = run.trainer.callback_metrics
    without_kl = "--model.kl_coef" in flags
    assert (run.model.ref_model is None) == without_kl and ("objective/kl" in metrics) != without_kl
    if not without_kl:
        assert metrics["objective/kl"] == 0.0  # policy == reference at the first rollout
    assert run.model.aggregation == ("token_mean" if flags else "sequence_mean")  # the flag, else GRPO's own
    _, first = calls[0]
    assert first["ratio"].item() == pytest.approx(1.0, abs=1e-6) and first["approxkl"].item() < 1e-10 and first["clipfrac"] == 0.0
    _, later = calls[-1]  # second epoch, after an optimizer step with a large learning rate
    assert abs(later["ratio"].item() - 1.0) > 1e-4
    assert run.trainer.global_step == 2 and len(calls) == 2 * 2  # 2 epochs x 2 micro-batches


POLICY_LOSS_PLUGIN = """
def reinforce(logprobs, advantages, mask):
    \"\"\"REINFORCE (Williams 1992): -A log pi per token, no ratio, no clip.\"\"\"
    return -advantages * logprobs, {"logprob": (logprobs * mask).sum() / mask.sum()}
"""


def test_a_policy_loss_from_the_users_own_file_trains_by_flag(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_policy_losses.py").write_text(POLICY_LOSS_PLUGIN)
    run = cli(["fit", *ppo_args(tiny_model_dir, tiny_reward_dir, real_rows, "--data.limit", "12", "--model.ppo_epochs", "1",
               "--model.gradient_accumulation_steps", "1", "--trainer.limit_train_batches", "1",
               "--model.policy_loss", "my_policy_losses.py:reinforce")])  # fmt: skip
    metrics = run.trainer.callback_metrics
    assert run.trainer.global_step == 1 and run.model.policy_loss.function.__name__ == "reinforce"
    assert metrics["policy/logprob"] < 0 and "val/ratio" not in metrics  # its own statistics, logged under policy/
    assert metrics["loss/policy_avg"] != 0


def test_a_resume_may_switch_the_kl_on_and_change_the_dapo_flags(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path, monkeypatch):
    """A run without KL has no reference; its resume with `kl_coef` > 0 loads one from the policy's source (the
    reference is never in a checkpoint), and a changed clip-higher is applied."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", *ppo_args(tiny_model_dir, tiny_reward_dir, real_rows, "--data.limit", "36", "--model.ppo_epochs", "1",
            "--model.gradient_accumulation_steps", "1", "--checkpoint.every_n_train_steps", "1", "--checkpoint.save_top_k", "-1",
            "--model.mask_truncated_completions", "true", *estimator_args("rloo"))]  # fmt: skip
    run = cli([*args, "--model.kl_coef", "0", "--model.cliprange_high", "0.28", "--trainer.max_steps", "2"])
    assert run.model.ref_model is None and "objective/kl" not in run.trainer.callback_metrics
    ckpt = tmp_path / "logs/ppo/version_0/checkpoints/epoch=0-step=1.ckpt"
    resumed = cli([*args, "--model.kl_coef", "0.05", "--model.kl_estimator", "k3", "--model.cliprange_high", "0.3", "--ckpt_path", str(ckpt)])
    assert resumed.model.ref_model is not None and resumed.model.hparams.cliprange_high == 0.3
    assert resumed.trainer.callback_metrics["objective/kl"] > 0 and resumed.trainer.global_step == 4  # k3 >= 0; > 0: the policy moved


# ---- dynamic sampling ----------------------------------------------------------------------------


def toy_rollout(scores: list[float], P: int, R: int, first: int):
    """A rollout of len(scores) rows whose ids are `first`, `first` + 1, ... on every token; P prompt, R response tokens."""
    from lit_rlhf.rollout import Rollout

    N = len(scores)
    input_ids = torch.arange(first, first + N)[:, None].repeat(1, P + R)
    labels = input_ids.clone()
    labels[:, :P] = -100
    return Rollout(input_ids=input_ids, attention_mask=torch.ones(N, P + R, dtype=torch.long), labels=labels,
                   response_mask=torch.ones(N, R), contains_eos=torch.ones(N, dtype=torch.bool), logprobs=torch.zeros(N, R),
                   entropies=torch.zeros(N, R), ref_logprobs=None, scores=torch.tensor(scores), source_scores=torch.tensor(scores)[:, None],
                   prompt_text=[f"p{first + i}" for i in range(N)])  # fmt: skip


@pytest.fixture
def dynamic_module(tiny_model_dir, tiny_reward_dir):
    """`(module, loader)`: GRPO with k = 2 whose rollouts of the loader's next batches are rounds 2 and 3 below, the loader's
    batches counted in `loader.taken` (None once `loader.left` is 0)."""
    module = PPOModule(reward_model_path=tiny_reward_dir, model_name_or_path=tiny_model_dir, advantage_estimator="grpo", num_generations=2,
                       dynamic_sampling_max_rounds=2, kl_coef=0.0)  # fmt: skip
    rounds = iter([toy_rollout([0.0, 1.0, 2.0, 2.0], P=3, R=2, first=10), toy_rollout([3.0, 3.0, 5.0, 4.0], P=2, R=4, first=20)])
    loader = types.SimpleNamespace(taken=0, left=2)

    def next_batch():
        if not loader.left:
            return None
        loader.taken, loader.left = loader.taken + 1, loader.left - 1
        return {}

    loader.next_batch = next_batch
    module._trainer = types.SimpleNamespace(train_dataloader=loader, strategy=types.SimpleNamespace(reduce=lambda t, reduce_op: t))
    module.rollout = lambda batch: next(rounds)
    module.transfer_batch_to_device = lambda batch, device, index: batch
    return module, loader


def test_dynamic_sampling_refills_a_batch_of_flat_groups(dynamic_module):
    """Round 1: both groups flat (1, 1), (0, 0); round 2: (0, 1) has a signal, (2, 2) not; round 3: (3, 3) not, (5, 4) has:
    the batch is the groups (0, 1) of round 2 and (5, 4) of round 3; 4 of the 6 groups sampled were flat. Round 2's
    rows (P 3, R 2) are right-padded to R 4, round 3's (P 2, R 4) left-padded to P 3."""
    module, loader = dynamic_module
    rollout, stats = module.dynamically_sampled(toy_rollout([1.0, 1.0, 0.0, 0.0], P=2, R=3, first=0))
    assert rollout.scores.tolist() == [0.0, 1.0, 5.0, 4.0] and rollout.prompt_text == ["p10", "p11", "p22", "p23"]
    assert stats["rollout/sampling_rounds"] == 3 and stats["rollout/flat_group_share"] == pytest.approx(4 / 6) and loader.taken == 2
    assert rollout.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0]] * 2 + [[0, 1, 1, 1, 1, 1, 1]] * 2
    assert rollout.labels[0].tolist() == [-100, -100, -100, 10, 10, -100, -100] and rollout.response_mask[0].tolist() == [1, 1, 0, 0]
    assert rollout.input_ids[2].tolist() == [0, 22, 22, 22, 22, 22, 22] and rollout.logprobs.shape == (4, 4)


def test_dynamic_sampling_stops_at_its_cap_and_fills_with_flat_groups(dynamic_module):
    """One more round at most: rounds 1 and 2 give one group with a signal, (0, 1), then the first flat one, (1, 1)."""
    module, loader = dynamic_module
    module.hparams.dynamic_sampling_max_rounds = 1
    rollout, stats = module.dynamically_sampled(toy_rollout([1.0, 1.0, 0.0, 0.0], P=2, R=3, first=0))
    assert rollout.scores.tolist() == [0.0, 1.0, 1.0, 1.0] and rollout.prompt_text == ["p10", "p11", "p0", "p1"]
    assert stats["rollout/sampling_rounds"] == 2 and stats["rollout/flat_group_share"] == 0.75 and loader.taken == 1


def test_dynamic_sampling_takes_nothing_for_a_full_batch_and_stops_at_the_end_of_the_epoch(dynamic_module):
    module, loader = dynamic_module
    rollout, stats = module.dynamically_sampled(toy_rollout([1.0, 0.0, 0.0, 2.0], P=2, R=3, first=0))
    assert rollout.scores.tolist() == [1.0, 0.0, 0.0, 2.0] and stats["rollout/sampling_rounds"] == 1 and loader.taken == 0
    loader.left = 0  # the epoch has no batch left
    rollout, stats = module.dynamically_sampled(toy_rollout([1.0, 1.0, 0.0, 0.0], P=2, R=3, first=0))
    assert rollout.scores.tolist() == [1.0, 1.0, 0.0, 0.0] and stats["rollout/flat_group_share"] == 1.0 and stats["rollout/sampling_rounds"] == 1


def test_the_batches_dynamic_sampling_takes_count_against_limit_train_batches(tiny_model_dir, tiny_reward_dir, real_rows, tmp_path, monkeypatch):
    """Every group flat (one score for all), 3 of the 12 batches of prompts for the epoch: the first step reads its batch and
    takes up to 2 more for its flat groups; 3 batches read in all, in fewer than 3 PPO steps, none past the limit."""
    monkeypatch.chdir(tmp_path)
    rollouts, rollout = [], PPOModule.rollout
    monkeypatch.setattr(PPOModule, "rollout", lambda self, batch: rollouts.append(batch["index"].tolist()) or rollout(self, batch))
    run = cli(ppo_args(tiny_model_dir, tiny_reward_dir, real_rows, "--data.limit", "28", "--model.gradient_accumulation_steps", "1",
                       "--model.dynamic_sampling_max_rounds", "2", "--model.advantage_estimator", "grpo", "--model.num_generations", "2",
                       "--model.ppo_epochs", "1", "--data.batch_size", "2", "--trainer.limit_train_batches", "3"), run=False)  # 12 batches  # fmt: skip
    run.model.score = types.MethodType(lambda self, batch, context_length: torch.zeros(len(batch["input_ids"])), run.model)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert len(rollouts) == 3 and run.trainer.global_step < 3  # one optimizer step per PPO step


def test_dynamic_sampling_needs_a_group_estimator():
    with pytest.raises(UserError, match="--model.dynamic_sampling_max_rounds .* needs a group estimator"):
        PPOModule(reward_model_path="unused", advantage_estimator="gae", dynamic_sampling_max_rounds=2)
