"""Multi-turn rollouts (`--model.environment`, `--model.tools`): token-exact conversations, the loss mask on the policy's
tokens only, limits and what ended each rollout, and a training step of every estimator on them."""

import json
from pathlib import Path

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from conftest import first_prompt_batch, make_tokenizer
from lit_rlhf.cli import cli
from lit_rlhf.environments import observation_text
from lit_rlhf.errors import UserError
from lit_rlhf.ppo import PPOModule
from lit_rlhf.rollout_engines import MultiTurnRollout
from lit_rlhf.tokenization import tokenize
from test_ppo import estimator_args, ppo_args, spy_policy_loss

ENVIRONMENT_FILE = """
class Script:
    \"\"\"Answers the policy's turn t (1, 2) with `go on` t times, then ends; its reward: the ASCII letters the policy wrote.\"\"\"

    def __init__(self, prompt, **columns):
        self.turns, self.reward = 0, 0.0

    def step(self, text):
        self.turns += 1
        self.reward += sum(c.isascii() and c.isalpha() for c in text)
        return "go on" * self.turns if self.turns < 3 else None
"""

TOOLS_FILE = """
import time


def sleeps(seconds):
    time.sleep(seconds)
    return "woke"
"""


def call(name: str, arguments: str) -> str:
    return f'<tool_call>{{"name": "{name}", "arguments": {arguments}}}</tool_call>'


def toy_policy(monkeypatch, script: tuple[str, ...] = ()) -> list[dict]:
    """The multi-turn engine's sampling replaced by a toy policy that ends its turns: its call j < len(script) answers
    every row with the text script[j]; later calls give the tiny model's first 2 sampled tokens. Each turn ends with
    EOS. -> one record per call: the `contexts` (input_ids, attention_mask) it was given and the `turns` it answered."""
    from lit_rlhf import rollout_engines

    sampled, calls = rollout_engines.generate, []

    def generate(model, batch, tokenizer, max_new_tokens, temperature, **kwargs):
        eos, n = tokenizer.eos_token_id, len(batch["input_ids"])
        if len(calls) < len(script):
            turns = [tokenize(tokenizer, script[len(calls)])] * n
        else:
            responses, mask, _ = sampled(model, batch, tokenizer, 2, temperature, **kwargs)
            turns = [row[m.bool()].tolist() for row, m in zip(responses, mask)]
        turns = [turn if turn[-1] == eos else turn + [eos] for turn in turns]
        calls.append({"contexts": {key: batch[key].clone() for key in ("input_ids", "attention_mask")}, "turns": turns})
        responses = pad_sequence([torch.tensor(turn) for turn in turns], batch_first=True, padding_value=tokenizer.pad_token_id)
        mask = pad_sequence([torch.ones(len(turn), dtype=torch.long) for turn in turns], batch_first=True)
        return responses, mask, torch.ones(n, dtype=torch.bool)

    monkeypatch.setattr(rollout_engines, "generate", generate)
    return calls


@pytest.fixture(scope="module")
def prompt_batch(tiny_model_dir, real_rows):
    return first_prompt_batch(tiny_model_dir, real_rows, batch_size=2)


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_env.py").write_text(ENVIRONMENT_FILE)
    (tmp_path / "my_tools.py").write_text(TOOLS_FILE)
    return tmp_path


def test_a_conversation_is_the_sampled_ids_and_the_observation_ids_and_the_loss_mask_is_the_policys(
    tiny_model_dir, tiny_reward_dir, prompt_batch, plugins, monkeypatch
):
    """2 prompts x 2 rollouts against `Script`: turn, `go on`, turn, `go ongo on`, turn, the end. Each turn's context is
    the prompt followed by exactly the ids of the conversation so far; nothing is tokenized again."""
    calls = toy_policy(monkeypatch)
    module = PPOModule(reward_model_path=tiny_reward_dir, model_name_or_path=tiny_model_dir, environment="my_env.py:Script", max_turns=4)
    tokenizer = module.tokenizer
    engine = module.started_engine()
    assert isinstance(engine, MultiTurnRollout)
    torch.manual_seed(0)
    samples = engine.sample(prompt_batch, 2, max_new_tokens=8, temperature=1.0)
    observations = [tokenize(tokenizer, observation_text(tokenizer, "go on" * t, "user")) for t in (1, 2)]
    assert observations[0] == tokenize(tokenizer, "\n<|im_start|>user\ngo on<|im_end|>\n<|im_start|>assistant\n")
    assert len(calls) == 3  # every rollout takes 3 turns
    prompts = prompt_batch["input_ids"].repeat_interleave(2, 0)
    for i in range(4):
        turns = [record["turns"][i] for record in calls]
        expected, sampled = turns[0] + observations[0] + turns[1] + observations[1] + turns[2], []
        for turn, observation in zip(turns, observations + [[]]):
            sampled += [1] * len(turn) + [0] * len(observation)
        R = len(expected)
        assert samples.responses[i, :R].tolist() == expected and samples.response_mask[i].sum() == R
        assert samples.policy_mask[i, :R].tolist() == sampled and samples.policy_mask[i, R:].sum() == 0
        prompt = prompts[i][prompt_batch["attention_mask"].repeat_interleave(2, 0)[i].bool()].tolist()
        starts = [0, len(turns[0] + observations[0]), R - len(turns[2])]  # where each turn starts in the response
        for record, start in zip(calls, starts):  # each turn's context: the prompt, then the conversation's ids up to it
            context = record["contexts"]["input_ids"][i][record["contexts"]["attention_mask"][i].bool()]
            assert context.tolist() == prompt + expected[:start]
        assert samples.environment_rewards[i] == sum(c.isascii() and c.isalpha() for turn in turns for c in module.decode(turn))
    assert samples.contains_eos.all()
    assert samples.episode["turns"].tolist() == [3.0] * 4 and samples.episode["ended_by_environment"].tolist() == [1.0] * 4
    assert samples.episode["tool_calls"].sum() == 0


@pytest.mark.parametrize("limits, turns, ended_by", [
    ({"max_turns": 2}, 2, "max_turns"),  # Script would answer turn 2; the rollout stops there
    ({"max_rollout_tokens": 12}, 1, "max_rollout_tokens"),  # turn 1 (3 tokens) + `go on` (15) do not fit
])  # fmt: skip
def test_the_limits_end_a_rollout_and_say_so(tiny_model_dir, tiny_reward_dir, prompt_batch, plugins, monkeypatch, limits, turns, ended_by):
    toy_policy(monkeypatch, script=("ab",))
    module = PPOModule(reward_model_path=tiny_reward_dir, model_name_or_path=tiny_model_dir, environment="my_env.py:Script", **limits)
    samples = module.started_engine().sample(prompt_batch, 1, max_new_tokens=8, temperature=1.0)
    assert samples.episode["turns"].tolist() == [turns] * 2 and samples.episode[f"ended_by_{ended_by}"].tolist() == [1.0] * 2
    shares = sum(value for name, value in samples.episode.items() if name.startswith("ended_by_"))
    assert shares.tolist() == [1.0] * 2  # one ending per rollout
    assert torch.equal(samples.response_mask, samples.policy_mask) == (turns == 1)


def test_a_turn_cut_by_its_length_ends_the_rollout_without_eos(tiny_model_dir, tiny_reward_dir, prompt_batch, plugins):
    """The tiny random model rarely says EOS within 4 tokens: its turns are cut (`response_length`)."""
    module = PPOModule(reward_model_path=tiny_reward_dir, model_name_or_path=tiny_model_dir, environment="my_env.py:Script")
    torch.manual_seed(0)
    samples = module.started_engine().sample(prompt_batch, 2, max_new_tokens=4, temperature=1.0)
    cut = ~samples.contains_eos
    assert cut.any() and torch.equal(samples.episode["ended_by_response_length"].bool(), cut)
    assert (samples.response_mask[cut].sum(1) == 4).all() and torch.equal(samples.response_mask, samples.policy_mask)


def test_a_hanging_tool_is_stopped_by_its_timeout_and_counted(tiny_model_dir, tiny_reward_dir, prompt_batch, plugins, monkeypatch):
    """Turn 1 calls the calculator, turn 2 a tool that sleeps 60 s (stopped after 1 s: its error is the observation), turn 3
    answers: 3 turns, 2 tool calls, 1 error, ended by the answer."""
    calls = toy_policy(monkeypatch, script=(call("calculator", '{"expression": "6 * 7"}'), call("sleeps", '{"seconds": 60}')))
    module = PPOModule(reward_model_path=tiny_reward_dir, model_name_or_path=tiny_model_dir, tools=["calculator", "my_tools.py:sleeps"],
                       environment_timeout=1.0)  # fmt: skip
    samples = module.started_engine().sample(prompt_batch, 1, max_new_tokens=128, temperature=1.0)
    episode = {name: value.tolist() for name, value in samples.episode.items()}
    assert episode["turns"] == [3.0] * 2 and episode["tool_calls"] == [2.0] * 2 and episode["tool_errors"] == [1.0] * 2
    assert episode["ended_by_environment"] == [1.0] * 2 and samples.environment_rewards is None
    text = module.tokenizer.decode(samples.responses[0][samples.response_mask[0].bool()])
    assert "<|im_start|>tool\n42<|im_end|>" in text
    assert "<|im_start|>tool\nerror: sleeps did not return within --model.environment_timeout 1 s<|im_end|>" in text
    assert len(calls) == 3


@pytest.mark.parametrize("estimator", ["gae", "rloo", "grpo", "reinforce_pp"])
def test_every_estimator_trains_on_multi_turn_rollouts_and_its_first_minibatch_is_on_policy(
    tiny_model_dir, real_rows, plugins, monkeypatch, estimator
):
    """A user's environment by flag, its reward the only one: the loss, KL and advantages cover the policy's tokens, not
    the observations, and the first minibatch's ratio is 1 with observations in the conversations."""
    toy_policy(monkeypatch)
    losses = spy_policy_loss(monkeypatch)
    args = ppo_args(tiny_model_dir, None, real_rows, "--data.limit", "12", "--data.batch_size", "4", "--model.ppo_epochs", "2",
                    "--model.gradient_accumulation_steps", "2", "--model.learning_rate", "1e-2", "--trainer.limit_train_batches", "1",
                    "--model.environment", "my_env.py:Script", *estimator_args(estimator))  # fmt: skip
    run = cli(args, run=False)
    rollouts = []
    rollout, compute_advantages = run.model.rollout, run.model.compute_advantages
    run.model.rollout = lambda batch: rollouts.append(rollout(batch)) or rollouts[-1]
    run.model.compute_advantages = lambda r: rollouts.append(compute_advantages(r)) or rollouts[-1]
    run.trainer.fit(run.model, datamodule=run.datamodule)
    scored = rollouts[-1]
    observations = scored.response_mask - scored.policy_mask  # (N, R) 1 on observation tokens
    assert observations.sum() > 0 and (observations >= 0).all()
    assert (scored.advantages * observations == 0).all() and (scored.kl * observations == 0).all()
    assert (scored.advantages * scored.policy_mask != 0).any()
    if scored.returns is not None:
        assert (scored.returns * observations == 0).all()
    metrics = run.trainer.callback_metrics
    assert metrics["rollout/turns"] == 3.0 and metrics["rollout/ended_by_environment"] == 1.0 and metrics["rewards/environment/mean"] >= 0
    assert metrics["objective/kl"] == 0.0 and run.trainer.global_step == 2
    _, first = losses[0]
    assert first["ratio"].item() == pytest.approx(1.0, abs=1e-6) and first["approxkl"].item() < 1e-10 and first["clipfrac"] == 0.0
    _, later = losses[-1]  # second epoch, after an optimizer step with a large learning rate
    assert abs(later["ratio"].item() - 1.0) > 1e-4


def test_a_tool_function_trains_a_step_by_flag_and_validates_on_conversations(tiny_model_dir, tiny_reward_dir, real_rows, plugins, monkeypatch):
    """The step's rollouts: a call, then an answer (2 turns). Validation's greedy response is a conversation too: its
    first turn calls the tool, so the policy is asked a second turn (a single-turn validation would ask once)."""
    tool_turn = call("calculator", '{"expression": "2 ** 5"}')
    calls = toy_policy(monkeypatch, script=(tool_turn, "x", tool_turn))
    run = cli(["fit", *ppo_args(tiny_model_dir, tiny_reward_dir, real_rows, "--data.limit", "12", "--data.batch_size", "4",
               "--model.ppo_epochs", "1", "--model.gradient_accumulation_steps", "1", "--trainer.limit_train_batches", "1",
               "--trainer.limit_val_batches", "1", "--model.tools", "[calculator, my_tools.py:sleeps]", "--model.response_length", "128",
               *estimator_args("grpo"))])  # fmt: skip
    metrics = run.trainer.callback_metrics
    assert isinstance(run.model.engine, MultiTurnRollout) and run.trainer.global_step == 1
    assert metrics["rollout/tool_calls"] == 1.0 and metrics["rollout/tool_errors"] == 0.0 and metrics["rollout/turns"] == 2.0
    assert "val_objective/scores" in metrics and len(calls) == 4  # 2 turns of the step, 2 of validation


def test_task_accuracy_answers_in_conversations_with_the_tools_and_counts_the_calls(tiny_model_dir, tmp_path, monkeypatch):
    """Two calculator problems, 6 * 7 and 6 * 8; the scripted policy calls the calculator on 6 * 7, then answers with
    the result it was given: right on the first problem only, greedy and sampled, every greedy answer with a call.
    Without the call (answering 42 at once) the same passes, and no call is counted."""
    from lit_rlhf.tasks import task_accuracy, tool_prompt

    monkeypatch.chdir(tmp_path)
    rows = [{"prompt": tool_prompt(6, "*", 7), "answer": 42}, {"prompt": tool_prompt(6, "*", 8), "answer": 48}]
    Path("task.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    flags = {"k": 1, "max_new_tokens": 128, "tools": ["calculator"], "max_turns": 3}  # the tiny tokenizer: a token a byte
    calls = toy_policy(monkeypatch, script=(call("calculator", '{"expression": "6 * 7"}'), "Answer: 42") * 2)  # greedy, then one sample
    report = task_accuracy({"base": tiny_model_dir}, "task.jsonl", **flags)["base"]
    assert report["greedy"][0] == 0.5 and report["greedy_passes"] == [1.0, 0.0] and report["pass@1"] == 0.5
    assert report["tool_call_rate"] == 1.0 and len(calls) == 4
    tokenizer = make_tokenizer()
    second_turn = tokenizer.decode(calls[1]["contexts"]["input_ids"][0])  # what the policy saw before answering
    assert second_turn.endswith("What is 6 times 7?<|im_end|>\n<|im_start|>assistant\n" + call("calculator", '{"expression": "6 * 7"}')
                                + "<|im_end|>\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
    toy_policy(monkeypatch, script=("Answer: 42",) * 2)
    report = task_accuracy({"base": tiny_model_dir}, "task.jsonl", **flags)["base"]
    assert report["greedy_passes"] == [1.0, 0.0] and report["tool_call_rate"] == 0.0
    with pytest.raises(UserError, match="--generation_engine vllm: conversations with --environment or --tools run on the hf engine"):
        task_accuracy({"base": tiny_model_dir}, "task.jsonl", generation_engine="vllm", **flags)
    with pytest.raises(UserError, match="--environment and --tools: give one"):
        task_accuracy({"base": tiny_model_dir}, "task.jsonl", environment="my_env.py:Script", **flags)
    Path("task.jsonl").write_text(Path("task.jsonl").read_text() + json.dumps({"prompt": [{"role": "tool", "content": "42"}], "answer": 1}) + "\n")
    with pytest.raises(UserError, match="task.jsonl: row 3: field 'prompt' must end with a 'user' message, ends with 'tool'"):
        task_accuracy({"base": "/nowhere"}, "task.jsonl", **flags)  # before any model is looked for


@pytest.mark.parametrize("turns, passes", [(("ab", "c"), [1.0]), (("1", "2"), [0.0])])
def test_task_accuracy_counts_the_environments_reward(tiny_model_dir, plugins, monkeypatch, turns, passes):
    """`Script`'s reward is the ASCII letters the policy wrote: 3 in `ab` + `c` (a pass without any reward function),
    0 in `1` + `2`."""
    from lit_rlhf.tasks import task_accuracy

    Path("task.jsonl").write_text(json.dumps({"prompt": "Write letters."}) + "\n")
    toy_policy(monkeypatch, script=turns + ("x",) * 4)  # greedy: 2 turns, Script's end; then the sample
    report = task_accuracy({"base": tiny_model_dir}, "task.jsonl", [], k=1, max_new_tokens=8, environment="my_env.py:Script", max_turns=2)
    assert report["base"]["greedy_passes"] == passes and report["base"]["tool_call_rate"] == 0.0


def test_step_stats_and_row_picking_of_a_multi_turn_rollout_by_hand():
    """Two conversations, R = 4: a policy token, an observation token, two policy tokens; and one policy token. The
    entropies and the generated tokens count the policy's 4 tokens, not the observation; the episode's counts are
    averaged, and picked and joined with their rows."""
    from lit_rlhf.rollout import Rollout, concatenated, step_stats

    response_mask, policy_mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    rollout = Rollout(
        input_ids=torch.zeros(2, 6, dtype=torch.long), attention_mask=torch.cat([torch.ones(2, 2), response_mask], 1).long(),
        labels=torch.zeros(2, 6, dtype=torch.long), response_mask=response_mask, policy_mask=policy_mask, contains_eos=torch.tensor([True, False]),
        logprobs=torch.zeros(2, 4), entropies=torch.tensor([[1.0, 100.0, 2.0, 3.0], [4.0, 0.0, 0.0, 0.0]]), ref_logprobs=None,
        scores=torch.tensor([1.0, 0.0]), source_scores=torch.tensor([[1.0], [0.0]]), kl=torch.zeros(2, 4), non_score_reward=torch.zeros(2, 4),
        episode={"turns": torch.tensor([2.0, 1.0]), "ended_by_environment": torch.tensor([1.0, 0.0])},
    )  # fmt: skip
    stats = step_stats(rollout, ["environment"], k=1, ppo_epochs=1, seconds={"generation": 2.0, "rollout": 3.0, "update": 1.0})
    assert stats["objective/entropy"] == (6.0 + 4.0) / 2 and stats["objective/entropy_per_token"] == 10.0 / 4
    assert stats["time/generated_tokens_per_s"] == 4 / 2.0 and stats["rollout/turns"] == 1.5 and stats["rollout/ended_by_environment"] == 0.5
    joined = concatenated([rollout, rollout]).rows([3, 0])
    assert joined.episode["turns"].tolist() == [1.0, 2.0] and torch.equal(joined.policy_mask, policy_mask.flip(0))


@pytest.mark.parametrize("flags, error", [
    ({"rollout_engine": "multi_turn"}, "--model.rollout_engine multi_turn needs --model.environment"),
    ({"tools": ["calculator"], "rollout_engine": "my_engines.py:Mine"}, r"run on the multi_turn engine \(hf or vllm\), not --model.rollout_engine my_engines.py:Mine"),
    ({"rollout_engine": "multi_turn_vllm"}, "--model.rollout_engine multi_turn_vllm needs --model.environment"),
    ({"tools": ["calculator"], "environment": "my_env.py:Script"}, "--model.environment and --model.tools: give one"),
    ({"max_turns": 0}, "--model.max_turns 0: must be > 0"),
])  # fmt: skip
def test_multi_turn_flags_are_checked_before_any_model_loads(flags, error):
    with pytest.raises(UserError, match=error):
        PPOModule(reward_model_path="unused", model_name_or_path="unused", **flags)
