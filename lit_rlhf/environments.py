"""Multi-turn rollouts: the environment contract, the tools, and what answers each policy turn.

An environment is a class of your own, `--model.environment my_env.py:GuessTheNumber`:

    class GuessTheNumber:
        reward = None  # optional: the rollout's reward, as the environment leaves it (None: none)

        def __init__(self, prompt, answer, **columns):  # one per rollout: the user's prompt and its row's columns
            self.answer = answer

        def step(self, text):  # each policy turn's text (special tokens skipped)
            if str(self.answer) in text:
                self.reward = 1.0
                return None  # the rollout ends
            return "No, try again."  # the next observation: a user turn

`reward` is the reward source `environment` (weighted as the others, `--model.reward_weights`; None: it does not
apply to the rollout). The environment runs in a worker process, `--model.environment_timeout` seconds per call:
one that raises, hangs or dies ends that rollout (`rollout/ended_by_environment_error`, and a warning); one that
cannot start from a row stops the run. Between turns the trainer keeps its attributes (lit_rlhf/tools.py), so
they must be picklable: plain data.

Tools are plain functions instead, `--model.tools '[calculator, my_tools.py:search]'`: a policy turn with a tool
call (lit_rlhf/tools.py, the format) is answered with the tool's return value as a `tool` turn, a turn without one
ends the rollout. A call that fails (a malformed call, an unknown tool, an exception, `--model.environment_timeout`
passed) is answered with `error: ...` and counted (`rollout/tool_errors`); the rollout goes on.

Observations are rendered with the chat template's own markers (`observation_text`) and appended to the ids the
policy sampled, which are kept as sampled: the conversation is never tokenized again.
"""

from dataclasses import dataclass
from typing import Optional

from lit_rlhf.errors import UserError
from lit_rlhf.rewards import CallFailed, SupervisedWorker, source_name
from lit_rlhf.tools import environment_class, tool, tool_call

#: what ends a multi-turn rollout, each logged as the share `rollout/ended_by_<name>`: the environment ended it (with
#: tools: a turn without a tool call), `max_turns` policy turns were taken, a turn reached `response_length` tokens
#: without EOS, the rollout reached `max_rollout_tokens` (a turn cut, or an observation that would not fit), the
#: environment's call failed
ENDINGS = ("environment", "max_turns", "response_length", "max_rollout_tokens", "environment_error")


@dataclass
class MultiTurn:
    """What answers the policy's turns and the limits of a conversation, with their defaults: the `--model.*` flags of
    the same names (lit_rlhf/ppo.py) and task-accuracy's, read by the multi-turn rollout engine."""

    environment: Optional[str] = None
    tools: Optional[list[str]] = None
    max_turns: int = 4
    max_rollout_tokens: int = 1024
    environment_timeout: float = 10.0


@dataclass
class Reply:
    """What answers one policy turn."""

    observation: Optional[str]  # the next turn's text; None: the rollout ends
    role: str = "user"  # the chat role it is rendered as
    tool_calls: int = 0
    tool_errors: int = 0
    error: Optional[str] = None  # why the environment's call failed (raised, hung, died): the rollout ends


class EnvironmentSessions:
    """The environments of a batch of rollouts (`--model.environment file.py:Class`), one per rollout, kept here
    between turns as their attributes and stepped in the `worker`."""

    def __init__(self, spec: str, worker: SupervisedWorker):
        environment_class(spec)  # imported here once, so that a wrong path fails at start, naming it
        self.spec, self.worker = spec, worker
        self.states: list[dict] = []

    def start(self, prompts: list[str], columns: list[dict]) -> None:
        """One environment per rollout, from its prompt row: the user's prompt and the row's other columns."""
        self.states = []
        for i, (prompt, row) in enumerate(zip(prompts, columns)):
            try:
                self.states.append(self.worker.request("lit_rlhf.tools:new_environment", self.spec, prompt, row))
            except CallFailed as err:
                raise UserError(f"--model.environment {self.spec} could not start from row {i} (prompt {prompt[:60]!r}): it {err}") from None

    def step(self, i: int, text: str) -> Reply:
        """Rollout `i`'s environment told the policy's turn `text`."""
        try:
            self.states[i], observation = self.worker.request("lit_rlhf.tools:environment_step", self.spec, self.states[i], text)
        except CallFailed as err:
            return Reply(None, error=str(err))
        return Reply(observation)

    def rewards(self) -> list:
        """(N,) each rollout's `reward` as its environment left it (None: none)."""
        return [state.get("reward", getattr(environment_class(self.spec), "reward", None)) for state in self.states]


class ToolSessions:
    """Tools a batch of rollouts may call (`--model.tools`), each call run in the `worker`."""

    def __init__(self, specs: list[str], worker: SupervisedWorker):
        self.specs = {source_name(spec): spec for spec in specs}  # the name a call gives -> the tool
        for spec in specs:  # imported here once, so that a wrong name or path fails at start, naming it
            tool(spec)
        self.worker = worker

    def start(self, prompts: list[str], columns: list[dict]) -> None:
        """Nothing to start: tools keep no state."""

    def step(self, i: int, text: str) -> Reply:
        """The tool call of the policy's turn `text` answered, or None (the end) without one."""
        try:
            call = tool_call(text)
        except ValueError as err:
            return Reply(f"error: {err}", "tool", tool_calls=1, tool_errors=1)
        if call is None:
            return Reply(None)
        name, arguments = call
        if name not in self.specs:
            return Reply(f"error: no tool {name!r}; the tools: {', '.join(self.specs)}", "tool", tool_calls=1, tool_errors=1)
        try:
            return Reply(self.worker.request("lit_rlhf.tools:call_tool", self.specs[name], arguments), "tool", tool_calls=1)
        except CallFailed as err:
            return Reply(f"error: {name} {err}", "tool", tool_calls=1, tool_errors=1)

    def rewards(self) -> None:
        """Tools give no reward."""


def sessions(environment: Optional[str], tools: Optional[list[str]], worker: SupervisedWorker):
    """What answers the policy's turns: the environment `environment` (a class's import path) or the `tools`."""
    return EnvironmentSessions(environment, worker) if environment else ToolSessions(tools, worker)


def observation_text(tokenizer, content: str, role: str) -> str:
    """What the chat template writes between an assistant turn's end-of-turn token (the policy's EOS, which it
    sampled) and the next assistant turn's content, for a `role` turn of `content`: with ChatML
    `\\n<|im_start|>tool\\n{content}<|im_end|>\\n<|im_start|>assistant\\n`. Read off the template on a stand-in
    conversation; a template that ends assistant turns otherwise, or that does not render a conversation append-only
    (a later turn changing an earlier one's text), is refused."""
    before = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]
    head = tokenizer.apply_chat_template(before, tokenize=False)
    full = tokenizer.apply_chat_template(before + [{"role": role, "content": content}], tokenize=False, add_generation_prompt=True)
    turn_end = head.rfind("!" + tokenizer.eos_token)  # the stand-in assistant turn's content, then its end-of-turn token
    if turn_end < 0 or not full.startswith(head):
        raise UserError("multi-turn rollouts append each observation to the policy's tokens: they need a chat template that ends an assistant"
                        f" turn with the EOS token {tokenizer.eos_token} and renders a conversation append-only")  # fmt: skip
    return full[turn_end + 1 + len(tokenizer.eos_token) :]
