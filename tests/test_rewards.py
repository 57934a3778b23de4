"""Reward functions (RL from verifiable rewards): the built-ins, the weighted mix, workers, timeouts, errors, PPO by flag."""

import json
import math
import time

import pytest
import torch

from lit_rlhf.cli import cli
from lit_rlhf.errors import UserError
from lit_rlhf.reward_functions import answer_format, final_number, repetition_penalty, soft_overlong_punishment
from lit_rlhf.rewards import RewardFunction, RewardFunctions, RewardModel, Rewards, Responses, reward_stats, weighted_total
from lit_rlhf.ppo import PPOModule
from test_ppo import ppo_args

NAN = math.nan


def test_final_number_and_answer_format_by_hand():
    completions = ["2 + 3 makes 5", "I think 1,024.", "no number", "Answer: 7", "7 or 8"]
    answers = [5, 1024, 3, 7.0, 7]
    assert final_number(["q"] * 5, completions, answer=answers) == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert final_number(["q"], ["5"], answer=[None]) == [None]  # a row without an answer: does not apply
    assert answer_format(["q"] * 3, ["so...\nAnswer: 12", "Answer: 12 apples", "answer: 12"]) == [1.0, 0.0, 0.0]


def test_soft_overlong_punishment_by_hand():
    """L_max 10, L_cache 4: 0 up to 6 tokens, then (6 - |y|) / 4: 7 -> -0.25, 9 -> -0.75, 10 -> -1; -1 beyond."""
    ids = [[1] * n for n in (3, 6, 7, 9, 10, 12)]
    rewards = soft_overlong_punishment([""] * 6, [""] * 6, completion_ids=ids, overlong_max_length=10, overlong_buffer_length=4)
    assert rewards == [0.0, 0.0, -0.25, -0.75, -1.0, -1.0]


def test_repetition_penalty_by_hand():
    """"a b c" three times: 7 word 3-grams, 3 distinct, so 4 of 7 repeat: -4/7. Upper case and spacing do not hide a
    repeat ("a b c" twice: 4 3-grams, 3 distinct: -1/4); four distinct words (2 distinct 3-grams) and two words (no 3-gram) cost nothing."""
    completions = ["a b c a b c a b c", "A  b C\na B c", "one two three four", "hi there"]
    assert repetition_penalty([""] * 4, completions) == pytest.approx([-4 / 7, -1 / 4, 0.0, 0.0])
    assert repetition_penalty([""], ["a a a a"], ngram_size=1, max_penalty=-2.0) == pytest.approx([-1.5])  # 3 of 4 repeat


def test_the_overlong_punishment_reads_each_responses_token_count_and_the_runs_settings_in_the_worker():
    """Responses of 1 to 4 tokens after a 1-token prompt, L_max 4, L_cache 2: 0 up to 2 tokens, -0.5 at 3, -1 at 4."""
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    batch = {"input_ids": torch.tensor([[7, 97, 98, 99, 100]] * 4) * mask, "attention_mask": mask}
    responses = Responses(batch, 1, ["p"] * 4, {}, decode=lambda ids: "".join(map(chr, ids.tolist())))
    functions = RewardFunctions(["soft_overlong_punishment"], timeout=30, settings={"overlong_max_length": 4, "overlong_buffer_length": 2})
    try:
        assert functions.sources()[0](responses).tolist() == [0.0, 0.0, -0.5, -1.0]
    finally:
        functions.close()
    assert responses.completion_ids[1] == [97, 98] and responses.completions[1] == "ab"


def test_the_overlong_flags_reach_the_reward_functions(tiny_model_dir):
    """L_max defaults to response_length, L_cache to a fifth of L_max."""
    settings = lambda **flags: PPOModule(model_name_or_path=tiny_model_dir, reward_funcs=["soft_overlong_punishment"],  # noqa: E731
                                         response_length=20, **flags).reward_functions.settings  # fmt: skip
    assert settings() == {"overlong_max_length": 20, "overlong_buffer_length": 4}
    assert settings(overlong_max_length=16, overlong_buffer_length=6) == {"overlong_max_length": 16, "overlong_buffer_length": 6}


def test_an_overlong_buffer_longer_than_the_max_length_is_refused(tiny_model_dir):
    with pytest.raises(UserError, match="--model.overlong_buffer_length 9 is longer than the max length 8"):
        PPOModule(model_name_or_path=tiny_model_dir, reward_funcs=["soft_overlong_punishment"], response_length=8, overlong_buffer_length=9)


def test_weighted_total_leaves_out_none_instead_of_counting_zero():
    # columns: a reward model, then two functions; row 1: the second function does not apply; row 2: no function does
    scores = torch.tensor([[1.0, 0.5, 1.0], [2.0, 1.0, NAN], [-1.0, NAN, NAN]])  # (N, F)
    weights, functions = torch.tensor([2.0, 1.0, 4.0]), torch.tensor([False, True, True])
    # row 0: 2*1 + 0.5 + 4*1 = 6.5; row 1: 2*2 + 1 = 5; row 2: 2*(-1) = -2
    assert weighted_total(scores, weights, functions).tolist() == [6.5, 5.0, -2.0]
    functions_only = torch.tensor([[1.0, 0.0], [NAN, 1.0], [NAN, NAN]])
    assert weighted_total(functions_only, torch.tensor([1.0, 1.0]), torch.tensor([True, True])).tolist() == [1.0, 1.0, 0.0]
    broken_model = torch.tensor([[NAN, 1.0], [1.0, 1.0]])  # a reward model's nan is an error, never "does not apply"
    assert weighted_total(broken_model, torch.tensor([1.0, 1.0]), torch.tensor([False, True]))[0].isnan()


def test_the_reward_model_and_the_functions_are_one_list_scored_into_one_matrix():
    """Each source one column, in the list's order; the weights apply by position, whatever kind a source is."""
    batch = {"input_ids": torch.tensor([[7, 97, 98], [7, 97, 97]]), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    responses = Responses(batch, 1, ["p", "q"], {}, decode=lambda ids: "".join(map(chr, ids.tolist())))
    assert responses.completions == ["ab", "aa"]
    worker = RewardFunctions([], timeout=1.0)
    worker.run = lambda spec, prompts, completions, columns: [None if c == "ab" else float(len(c)) for c in completions]
    model = RewardModel(lambda batch, P: batch["input_ids"][:, P:].sum(1).float())  # 97 + 98, 97 + 97
    rewards = Rewards([RewardFunction("length", "length", worker), model], weights=[10.0, 0.5])
    scores = rewards(responses)
    assert rewards.names == ["length", "reward_model"] and scores.shape == (2, 2)
    assert scores[0, 0].isnan() and scores[1].tolist() == [2.0, 194.0]
    assert rewards.total(scores).tolist() == [0.5 * 195, 10 * 2 + 0.5 * 194]  # the function's None left out of row 0
    with pytest.raises(UserError, match=r"--model.reward_weights has 1 values for 2 reward sources \(length, reward_model\)"):
        Rewards([RewardFunction("length", "length", worker), model], weights=[1.0])


def test_reward_stats_count_nones_and_flat_groups():
    scores = torch.tensor([[1.0, 0.0, NAN, 1.0], [NAN, NAN, NAN, 0.5]]).T  # (N, F)
    total = torch.tensor([1.0, 1.0, 0.0, 1.5])  # groups of k = 2: (1, 1) flat, (0, 1.5) not
    stats = reward_stats(scores, ["exact", "fmt"], total, k=2)
    assert stats["rewards/exact/mean"] == pytest.approx(2 / 3) and stats["rewards/exact/none_share"] == 0.25
    assert stats["rewards/fmt/mean"] == 0.5 and stats["rewards/fmt/none_share"] == 0.75
    assert stats["rewards/unscored_share"] == 0.25 and stats["rewards/flat_group_share"] == 0.5


PLUGIN = '''
import json, os, time


def count_a(prompts, completions, **columns):
    return [float(c.count("a")) for c in completions]


def ascii_share(prompts, completions, **columns):
    """A toy verifiable reward: the share of a response's characters that are printable ASCII."""
    return [sum(32 <= ord(ch) < 127 for ch in c) / max(1, len(c)) for c in completions]


def record(prompts, completions, **columns):
    with open(os.environ["RECORD_FILE"], "a") as f:
        f.write(json.dumps({"prompts": prompts, "columns": columns}) + "\\n")
    return [None if i % 3 == 2 else 1.0 for i in range(len(prompts))]


def sleeps(prompts, completions, **columns):
    time.sleep(60)
    return [0.0] * len(prompts)


def fails_on_b(prompts, completions, **columns):
    return [1.0 / (c != "b") for c in completions]


def too_few(prompts, completions, **columns):
    return [0.0]


def not_a_number(prompts, completions, **columns):
    return ["1.0" for _ in completions]
'''


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text(PLUGIN)
    return "my_rewards.py"


def test_a_hanging_function_is_stopped_within_its_timeout(plugin):
    functions = RewardFunctions([f"{plugin}:sleeps"], timeout=2.0)
    start = time.monotonic()
    with pytest.raises(UserError, match=r"reward function sleeps did not return within --model.reward_timeout 2 s on a batch of 2 rows"):
        functions(["p", "q"], ["a", "b"], {})
    assert time.monotonic() - start < 2.0 + 10  # the worker's start-up, then the timeout: not the function's 60 s
    assert functions.worker is None  # the hung worker was terminated
    lenient = RewardFunctions([f"{plugin}:sleeps", f"{plugin}:count_a"], timeout=2.0, on_error="none")
    with pytest.warns(UserWarning, match="reward function sleeps failed .* its 2 rows get None"):
        slept, counted = lenient(["p", "q"], ["a", "ab"], {})
    assert all(math.isnan(r) for r in slept) and counted == [1.0, 1.0] and lenient.failures == 1
    lenient.close()


def test_a_raising_function_names_the_row_and_the_error(plugin):
    functions = RewardFunctions([f"{plugin}:fails_on_b"], timeout=20.0)
    with pytest.raises(UserError, match=r"reward function fails_on_b raised ZeroDivisionError: float division by zero on row 1 \(prompt 'q'\)"):
        functions(["p", "q", "r"], ["a", "b", "c"], {})
    functions.close()


@pytest.mark.parametrize("name, message", [
    ("too_few", "reward function too_few returned 1 values for 3 rows: it must return one float or None per row"),
    ("not_a_number", "reward function not_a_number returned '1.0' for row 0: it must return a finite float or None"),
])  # fmt: skip
def test_a_wrong_return_is_refused(plugin, name, message):
    functions = RewardFunctions([f"{plugin}:{name}"], timeout=20.0)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        functions(["p", "q", "r"], ["a", "b", "c"], {})
    functions.close()


def prompt_rows(tmp_path, n: int = 12):
    rows = [{"prompt": f"What is {i} + {i}?", "answer": 2 * i, "tag": f"row{i}"} for i in range(n)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def function_args(tiny_model_dir, dataset, *extra):
    """PPO on prompt rows with reward functions and no reward model."""
    return ppo_args(tiny_model_dir, None, dataset, *extra)


def test_columns_reach_the_function_per_sampled_response_in_order(tiny_model_dir, plugin, tmp_path, monkeypatch):
    monkeypatch.setenv("RECORD_FILE", str(tmp_path / "calls.jsonl"))
    run = cli(["fit", *function_args(tiny_model_dir, prompt_rows(tmp_path), "--data.limit", "12", "--data.batch_size", "2",
               "--model.reward_funcs", f"[{plugin}:record]", "--model.advantage_estimator", "grpo", "--model.num_generations", "3",
               "--model.gradient_accumulation_steps", "1", "--model.ppo_epochs", "1", "--trainer.limit_train_batches", "2")])  # fmt: skip
    assert run.model.reward_model is None and run.model.value_model is None
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 2
    for call in calls:
        prompts, columns = call["prompts"], call["columns"]
        assert len(prompts) == 6 and prompts[0] == prompts[1] == prompts[2] and prompts[3] == prompts[4] == prompts[5]
        for j, prompt in enumerate(prompts):  # each response carries its own prompt's row
            i = int(prompt.split()[2])
            assert columns["answer"][j] == 2 * i and columns["tag"][j] == f"row{i}"
    # the third response of each group got None: left out of its total (0 here, no other source), counted
    metrics = run.trainer.callback_metrics
    assert metrics["rewards/record/none_share"] == pytest.approx(1 / 3) and metrics["rewards/record/mean"] == 1.0
    assert metrics["rewards/unscored_share"] == pytest.approx(1 / 3)


def test_a_function_and_a_reward_model_combine_with_their_weights(tiny_model_dir, tiny_reward_dir, plugin, real_rows):
    from test_ppo import PPOModule

    module = PPOModule(reward_model_path=tiny_reward_dir, model_name_or_path=tiny_model_dir, response_length=6,
                       reward_funcs=[f"{plugin}:count_a"], reward_weights=[0.5, 2.0])  # fmt: skip
    module.score = lambda batch, P: torch.full((len(batch["input_ids"]),), 3.0)  # the reward model says 3 everywhere
    module.reward_functions.run = lambda spec, prompts, completions, columns: [float(c.count("a")) for c in completions]
    batch = {"input_ids": torch.tensor([[5, 6], [0, 7]]), "attention_mask": torch.tensor([[1, 1], [0, 1]]), "prompt_text": ["x", "y"], "columns": {}}
    torch.manual_seed(0)
    rollout = module.rollout(batch)
    completions = [module.tokenizer.decode(r[m.bool()], skip_special_tokens=True)
                   for r, m in zip(rollout.input_ids[:, 2:], rollout.response_mask)]  # fmt: skip
    expected = [0.5 * 3.0 + 2.0 * c.count("a") for c in completions]
    assert rollout.scores.tolist() == expected
    assert module.rewards.names == ["reward_model", "count_a"]
    with pytest.raises(UserError, match=r"--model.reward_weights has 1 values for 2 reward sources \(reward_model, count_a\)"):
        PPOModule(reward_model_path=tiny_reward_dir, model_name_or_path=tiny_model_dir, reward_funcs=[f"{plugin}:count_a"], reward_weights=[1.0])
    with pytest.raises(UserError, match="PPO needs a reward"):
        PPOModule(model_name_or_path=tiny_model_dir)


@pytest.mark.parametrize("estimator", ["grpo", "gae"])
def test_a_function_reward_is_learned_without_a_reward_model(tiny_model_dir, plugin, real_rows, tmp_path, estimator):
    """The toy verifiable reward: the share of printable ASCII characters of the response (about half at random init)."""
    group = ["--model.num_generations", "4", "--data.batch_size", "4"] if estimator == "grpo" else ["--data.batch_size", "16"]
    run = cli(function_args(tiny_model_dir, real_rows, "--data.limit", "164", "--model.learning_rate", "1e-2", "--model.kl_coef", "0.01",
                            "--model.temperature", "1.0", "--model.gradient_accumulation_steps", "1", "--model.ppo_epochs", "4",
                            "--seed_everything", "0", "--trainer.limit_train_batches", "10", "--model.reward_funcs", f"[{plugin}:ascii_share]",
                            "--model.advantage_estimator", estimator, *group), run=False)  # fmt: skip
    scores = []
    original = run.model.training_step

    def training_step(batch, batch_idx):
        original(batch, batch_idx)
        scores.append(run.trainer.callback_metrics["objective/scores"].item())

    run.model.training_step = training_step
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert (run.model.value_model is not None) == (estimator == "gae")  # gae: a value model from the policy's backbone
    assert sum(scores[-3:]) / 3 > sum(scores[:3]) / 3 + 0.1, scores


def test_first_minibatch_is_on_policy_with_functions_and_a_resume_keeps_them(tiny_model_dir, plugin, tmp_path, monkeypatch):
    from lit_rlhf.policy_losses import POLICY_LOSSES

    calls = []
    original, paper = POLICY_LOSSES["ppo"]
    monkeypatch.setitem(POLICY_LOSSES, "ppo", (lambda **k: calls.append(original(**k)) or calls[-1], paper))
    args = ["fit", *function_args(tiny_model_dir, prompt_rows(tmp_path, 24), "--data.limit", "24", "--data.batch_size", "4",
            "--model.reward_funcs", f"[{plugin}:count_a, final_number]", "--model.reward_weights", "[1.0, 2.0]",
            "--model.gradient_accumulation_steps", "1", "--model.ppo_epochs", "1", "--checkpoint.every_n_train_steps", "1",
            "--checkpoint.save_top_k", "-1")]  # fmt: skip
    cli([*args, "--trainer.max_steps", "2"])
    _, first = calls[0]
    assert first["ratio"].item() == pytest.approx(1.0, abs=1e-6) and first["clipfrac"] == 0.0
    resumed = cli([*args, "--ckpt_path", str(tmp_path / "logs/ppo/version_0/checkpoints/epoch=0-step=1.ckpt")])
    assert resumed.model.rewards.names == ["count_a", "final_number"] and resumed.model.rewards.weights == [1.0, 2.0]
    assert resumed.trainer.global_step == 5


# ---- the verifiable task ----------------------------------------------------------------------


def test_arithmetic_splits_share_no_problem_and_final_number_checks_them():
    from lit_rlhf.reward_functions import final_number
    from lit_rlhf.tasks import arithmetic

    train, heldout = arithmetic(300, 100, seed=0)
    assert len(train) == 300 and len(heldout) == 100
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert len({r["prompt"] for r in train}) == 300  # no repeats
    assert arithmetic(300, 100, seed=0) == (train, heldout)  # seeded
    other_train, other_heldout = arithmetic(300, 100, seed=1)
    assert not {r["prompt"] for r in other_train} & {r["prompt"] for r in heldout}  # the split does not depend on the seed
    with pytest.raises(UserError, match=r"--num_heldout 300: its split holds \d+ of the 800 problems with operands 1 to 20"):
        arithmetic(100, 300)
    for row in train[:20]:
        a, op, b = row["prompt"].split()[2:5]
        assert row["answer"] == (int(a) + int(b.rstrip("?")) if op == "+" else int(a) - int(b.rstrip("?")))
    completions = [f"Let me think.\nAnswer: {r['answer']}" for r in heldout[:5]] + [f"Answer: {r['answer'] + 1}" for r in heldout[5:10]]
    assert final_number([r["prompt"] for r in heldout[:10]], completions, answer=[r["answer"] for r in heldout[:10]]) == [1.0] * 5 + [0.0] * 5



def test_the_calculator_task_teaches_the_tool_and_keeps_each_problems_split():
    """`--tool calculator` writes the same problems as chat messages: the system turn says how to call the tool, the
    worked example's call is one the calculator answers with the example's answer, and the question names the operator
    in words."""
    from lit_rlhf.tasks import arithmetic
    from lit_rlhf.tools import calculator, tool_call

    plain, tool = (arithmetic(50, 20, seed=0, ops="*", min_operand=10, max_operand=40, tool=t) for t in (None, "calculator"))
    for p, t in zip(plain[0] + plain[1], tool[0] + tool[1]):
        a, _, b = p["prompt"].split()[2:5]
        assert p["answer"] == t["answer"] == int(a) * int(b.rstrip("?"))
        assert t["prompt"][-1] == {"role": "user", "content": f"What is {a} times {b}"}
    assert not {str(r["prompt"]) for r in tool[0]} & {str(r["prompt"]) for r in tool[1]}
    system, question, example_call, result, answer, _ = tool[0][0]["prompt"]
    assert [m["role"] for m in (system, question, example_call, result, answer)] == ["system", "user", "assistant", "tool", "assistant"]
    assert "<tool_call>" in system["content"] and question["content"] == "What is 23 * 41?"
    name, arguments = tool_call(example_call["content"])
    assert name == "calculator" and calculator(**arguments) == result["content"] == str(23 * 41) and answer["content"] == "Answer: 943"
    with pytest.raises(UserError, match=r"--ops '\+/' --min_operand 1 --max_operand 20: operators of \+-\*"):
        arithmetic(10, 5, ops="+/")

TASK_PLUGIN = '''
def always(prompts, completions, answer, **columns):
    assert len(answer) == len(completions)
    return [1.0] * len(completions)


def never(prompts, completions, **columns):
    return [0.0] * len(completions)


def up_to_2_tokens(prompts, completions, completion_ids, **columns):
    return [float(len(ids) <= 2) for ids in completion_ids]
'''


def test_task_accuracy_reports_pass_at_1_and_pass_at_k(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from lit_rlhf.commands import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "judges.py").write_text(TASK_PLUGIN)
    main(["arithmetic", "--out", "task", "--num_train", "10", "--num_heldout", "6"])
    common = ["--models", json.dumps({"base": tiny_model_dir, "again": tiny_model_dir}), "--dataset", "task/heldout.jsonl", "--k", "2",
              "--max_new_tokens", "3"]  # fmt: skip
    main(["task-accuracy", *common, "--reward_funcs", "[judges.py:always]"])
    out = capsys.readouterr().out
    assert "| base | 1.000 [1.000, 1.000] |  | 1.000 | 1.000 |" in out and "| again | 1.000 [1.000, 1.000] | 0.000 [0.000, 0.000] | 1.000 | 1.000 |" in out
    assert "6 problems, answers of at most 3 tokens" in out
    from lit_rlhf.tasks import task_accuracy

    never = task_accuracy({"base": tiny_model_dir}, "task/heldout.jsonl", ["judges.py:never"], k=2, max_new_tokens=3)
    assert never["base"]["greedy"] == (0.0, 0.0, 0.0) and never["base"]["pass@2"] == 0.0
    one = task_accuracy({"base": tiny_model_dir}, "task/heldout.jsonl", ["judges.py:always"], k=1, max_new_tokens=3)  # pass@1 of one sample beside greedy
    assert one["base"]["greedy"] == (1.0, 1.0, 1.0) and one["base"]["pass@1"] == 1.0
    by_ids = [task_accuracy({"base": tiny_model_dir}, "task/heldout.jsonl", ["judges.py:up_to_2_tokens"], k=1, max_new_tokens=n) for n in (2, 3)]
    assert by_ids[0]["base"]["greedy"] == (1.0, 1.0, 1.0) and by_ids[1]["base"]["greedy"][0] < 1  # the functions read completion_ids
