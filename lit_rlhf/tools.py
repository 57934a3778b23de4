"""Tools and environments as the worker process runs them (`--model.tools`, `--model.environment`), and the tool-call format.

A tool is a plain Python function (TRL's `tools`): the policy calls it by writing, in its turn,

    <tool_call>{"name": "calculator", "arguments": {"expression": "3 * (4 + 5)"}}</tool_call>

and the function's return value (as text) is the next turn, a `tool` turn of the chat template; a turn without
a tool call is the policy's answer and ends the rollout. Built in: `calculator` (`TOOLS`).

An environment is a class of the user's own (lit_rlhf/environments.py has the contract). In the worker it is
rebuilt from its attributes at every call and its attributes sent back after it (`new_environment`,
`environment_step`): the trainer keeps each rollout's environment between turns, so a call that hangs or
crashes ends that rollout alone. Its attributes must therefore be picklable (plain data).

This module imports only the standard library, as lit_rlhf/reward_functions.py: the worker starts in a fraction
of a second.
"""

import ast
import functools
import json
import math
import operator
import re
from typing import Optional

from lit_rlhf.plugins import resolve

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)

BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}  # fmt: skip
UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPRESSION_CHARS = 200
MAX_POWER_BITS = 10_000  # a power whose result would need more bits is refused, not computed


def arithmetic(node: ast.AST):
    """The value of an arithmetic expression's syntax tree: numbers, + - * / // % ** and parentheses, nothing else."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY:
        return UNARY[type(node.op)](arithmetic(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY:
        left, right = arithmetic(node.left), arithmetic(node.right)
        if isinstance(node.op, ast.Pow) and math.log2(max(2, abs(left))) * abs(right) > MAX_POWER_BITS:
            raise ValueError("the power is too large")
        return BINARY[type(node.op)](left, right)
    raise ValueError(f"not arithmetic: {ast.unparse(node)}")


def calculator(expression: str) -> str:
    """The value of an arithmetic `expression` (numbers, + - * / // % ** and parentheses; no names, no calls: nothing
    but arithmetic is evaluated), e.g. `3 * (4 + 5)` -> `27`, `7 / 2` -> `3.5`."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    value = arithmetic(tree.body)
    if isinstance(value, complex):
        raise ValueError("the result is not a real number")
    return str(int(value)) if isinstance(value, float) and value.is_integer() and abs(value) < 2**53 else str(value)


#: built-in tools for `--model.tools`
TOOLS = {"calculator": calculator}


def tool_call_text(name: str, arguments: dict) -> str:
    """The text of a call of the tool `name` with keyword `arguments`, as a policy writes it (what `tool_call` reads)."""
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def tool_call(text: str) -> Optional[tuple[str, dict]]:
    """The first tool call of a policy turn `text`: (tool name, keyword arguments); None if the turn has none (an answer).
    A call that is not `{"name": ..., "arguments": {...}}` JSON raises ValueError saying what is wrong."""
    match = TOOL_CALL.search(text)
    if match is None:
        return None
    try:
        call = json.loads(match.group(1))
    except json.JSONDecodeError as err:
        raise ValueError(f"the tool call is not JSON ({err})") from None
    if not (isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments", {}), dict)):
        raise ValueError('a tool call is {"name": "<tool>", "arguments": {...}}')
    return call["name"], call.get("arguments", {})


@functools.cache
def tool(spec: str):
    """The tool `spec` names (a `TOOLS` key or an import path), imported once per process."""
    return resolve(spec, TOOLS, "--model.tools")


@functools.cache
def environment_class(spec: str) -> type:
    """The environment class an import path `file.py:Class` names, imported once per process."""
    return resolve(spec, {}, "--model.environment")


def call_tool(spec: str, arguments: dict) -> str:
    """The tool `spec` called with `arguments`: its return value as text."""
    return str(tool(spec)(**arguments))


def new_environment(spec: str, prompt: str, columns: dict) -> dict:
    """A new environment of the class `spec` for one rollout, from its prompt row (the user's `prompt` and the row's
    other `columns` as keyword arguments): its attributes."""
    return vars(environment_class(spec)(prompt=prompt, **columns))


def environment_step(spec: str, state: dict, text: str) -> tuple[dict, Optional[str]]:
    """The environment of class `spec` with the attributes `state`, told the policy's turn `text`: its attributes after
    the step and the next observation (None: the rollout ends)."""
    environment = object.__new__(environment_class(spec))
    environment.__dict__.update(state)
    observation = environment.step(text)
    if observation is not None and not isinstance(observation, str):
        raise TypeError(f"step returned a {type(observation).__name__}: it must return the next observation's text or None")
    return vars(environment), observation
