"""Tools and environments of multi-turn rollouts: the calculator, the tool-call format, the observation's rendering with
the chat template, and the calls in a worker process with a timeout."""

import time

import pytest
from conftest import SMOLLM2_CHAT_TEMPLATE, make_tokenizer
from lit_rlhf.environments import EnvironmentSessions, Reply, ToolSessions, observation_text
from lit_rlhf.errors import UserError
from lit_rlhf.rewards import SupervisedWorker
from lit_rlhf.tokenization import render_prompt
from lit_rlhf.tools import calculator, tool_call


@pytest.mark.parametrize("expression, value", [("3 * (4 + 5)", "27"), ("7 / 2", "3.5"), ("2 ** 10", "1024"), ("-(1.5) + 4 // 3", "-0.5"),
                                               ("10 % 4", "2"), ("6 / 3", "2"), (" 1 + 1 ", "2")])  # fmt: skip
def test_the_calculator_evaluates_arithmetic(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("expression, error", [
    ("__import__('os').system('true')", "not arithmetic"), ("x + 1", "not arithmetic"), ("[1, 2]", "not arithmetic"),
    ("(1).__class__", "not arithmetic"), ("9 ** 9 ** 9", "the power is too large"), ("1 +", "not an arithmetic expression"),
    ("1" * 201, "longer than 200 characters"), ("(-8) ** 0.5", "not a real number"), ("True + 1", "not arithmetic"),
])  # fmt: skip
def test_the_calculator_evaluates_nothing_but_arithmetic(expression, error):
    with pytest.raises(ValueError, match=error):
        calculator(expression)


def test_tool_calls_are_read_from_a_turn():
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "1 + 2"}}</tool_call>'
    assert tool_call(f"Let me compute. {call} and then") == ("calculator", {"expression": "1 + 2"})
    assert tool_call("The answer is 3.") is None and tool_call("<tool_call>{...") is None  # no call: an answer
    with pytest.raises(ValueError, match="not JSON"):
        tool_call("<tool_call>calculator(1 + 2)</tool_call>")
    with pytest.raises(ValueError, match='a tool call is {"name"'):
        tool_call('<tool_call>{"tool": "calculator"}</tool_call>')


@pytest.mark.parametrize("template", ["chatml", "smollm2"])
def test_observations_render_the_conversation_append_only(tokenizer, template):
    """The prompt, each policy turn with its EOS and each observation's text, concatenated, are the chat template's own
    rendering of the whole conversation: appending never changes what came before."""
    if template == "smollm2":  # its default system turn comes first
        tokenizer = make_tokenizer()
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    eos = tokenizer.eos_token
    messages = [{"role": "user", "content": "What is 3 * 9?"}, {"role": "assistant", "content": "<tool_call>...</tool_call>"},
                {"role": "tool", "content": "27"}, {"role": "assistant", "content": "Is that right?"},
                {"role": "user", "content": "Yes."}, {"role": "assistant", "content": "27."}]  # fmt: skip
    text = render_prompt(tokenizer, messages[:1])
    for turn, observation in zip(messages[1::2], messages[2::2] + [None]):
        text += turn["content"] + eos  # what the policy sampled, up to its EOS
        if observation is not None:
            text += observation_text(tokenizer, observation["content"], observation["role"])
    assert tokenizer.apply_chat_template(messages, tokenize=False) == text + "\n"  # the template ends the last turn with "\n"
    assert observation_text(tokenizer, "27", "tool") == f"\n<|im_start|>tool\n27{eos}\n<|im_start|>assistant\n"


def test_a_template_that_rewrites_earlier_turns_is_refused():
    rewriting = make_tokenizer()
    rewriting.chat_template = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}<|im_end|>{% endif %}{% endfor %}"
    with pytest.raises(UserError, match="need a chat template that ends an assistant turn with the EOS token <|im_end|> and renders a conversation append-only"):
        observation_text(rewriting, "27", "tool")


TOOLS_FILE = """
import time


def sleeps(seconds):
    time.sleep(seconds)
    return "woke"


def shout(text):
    return text.upper()
"""

ENVIRONMENT_FILE = """
import time


class Countdown:
    \"\"\"Says how many turns are left; rewards a turn that says the row's `answer`; hangs on `hang`, raises on `raise`.\"\"\"

    reward = None

    def __init__(self, prompt, answer, **columns):
        self.answer, self.left = answer, 2

    def step(self, text):
        if text == "hang":
            time.sleep(60)
        if text == "raise":
            raise RuntimeError("no")
        if text == str(self.answer):
            self.reward = 1.0
            return None
        self.left -= 1
        return f"{self.left} left" if self.left else None
"""


@pytest.fixture
def plugin_files(tmp_path):
    (tmp_path / "my_tools.py").write_text(TOOLS_FILE)
    (tmp_path / "my_env.py").write_text(ENVIRONMENT_FILE)
    return tmp_path


def test_tool_calls_run_in_the_worker_and_a_hanging_one_is_stopped_and_counted(plugin_files):
    worker = SupervisedWorker("environment", timeout=2.0)
    tools = ToolSessions(["calculator", f"{plugin_files}/my_tools.py:sleeps", f"{plugin_files}/my_tools.py:shout"], worker)
    call = '<tool_call>{{"name": "{}", "arguments": {}}}</tool_call>'.format
    try:
        assert tools.step(0, call("calculator", '{"expression": "3 * 9"}')) == Reply("27", "tool", tool_calls=1)
        assert tools.step(0, "It is 27.") == Reply(None)  # no call: the answer
        start = time.monotonic()
        hung = tools.step(1, call("sleeps", '{"seconds": 60}'))
        assert time.monotonic() - start < 2.0 + 10  # the worker's start-up, then the timeout: not the tool's 60 s
        assert hung == Reply("error: sleeps did not return within --model.environment_timeout 2 s", "tool", tool_calls=1, tool_errors=1)
        assert worker.worker is None  # the hung worker was stopped
        assert tools.step(2, call("shout", '{"text": "hi"}')) == Reply("HI", "tool", tool_calls=1)  # a new worker
        assert tools.step(0, call("calculator", '{"expression": "1 / 0"}')).observation == "error: calculator raised ZeroDivisionError: division by zero"
        assert tools.step(0, call("search", "{}")) == Reply("error: no tool 'search'; the tools: calculator, sleeps, shout", "tool", 1, 1)
        assert tools.step(0, "<tool_call>calculator(1)</tool_call>").tool_errors == 1
    finally:
        worker.close()


def test_environments_keep_their_state_between_turns_and_one_that_fails_ends_its_rollout_alone(plugin_files):
    worker = SupervisedWorker("environment", timeout=2.0)
    sessions = EnvironmentSessions(f"{plugin_files}/my_env.py:Countdown", worker)
    try:
        sessions.start(["p0", "p1", "p2"], [{"answer": 7}, {"answer": 8}, {"answer": 9}])
        assert [sessions.step(i, "guess").observation for i in range(3)] == ["1 left"] * 3
        assert sessions.step(0, "7") == Reply(None) and sessions.step(1, "guess") == Reply(None)  # answered; out of turns
        hung = sessions.step(2, "hang")
        assert hung.observation is None and hung.error == "did not return within --model.environment_timeout 2 s"
        assert sessions.step(1, "raise").error == "raised RuntimeError: no"
        assert sessions.rewards() == [1.0, None, None]
        assert sessions.step(2, "9") == Reply(None) and sessions.rewards()[2] == 1.0  # its state survived the stopped worker
    finally:
        worker.close()
    with pytest.raises(UserError, match=r"--model.environment .*my_env.py:Countdown could not start from row 0 \(prompt 'p0'\): it raised TypeError: .*'answer'$"):
        sessions.start(["p0"], [{}])  # a row without the column the environment needs
    worker.close()
