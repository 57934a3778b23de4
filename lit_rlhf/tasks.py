"""A verifiable task made in code, and the accuracy of models on it (RL from verifiable rewards).

`lit-rlhf arithmetic --out DIR` writes `DIR/train.jsonl` and `DIR/heldout.jsonl`: prompt rows
(`prompt`, `answer`) that `--data.mode prompts` reads and the `final_number` reward function checks.
A problem's split is decided by a hash of its text, so the two files never share a problem,
whatever the seed and sizes.

`lit-rlhf task-accuracy --models '{base: PATH, grpo: PATH}' --dataset DIR/heldout.jsonl` reports, per
model, greedy pass@1 with a bootstrap 95 % interval and pass@k of k sampled answers, each answer
judged by reward functions (a reward of 1 is a pass).
"""

import hashlib
import json
import math
import operator
import random
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Literal, Optional

import torch
from jsonargparse import ArgumentParser

from lit_rlhf.tokenization import render_prompt, tokenize
from lit_rlhf.errors import UserError, check_ranges
from lit_rlhf.generation import Engine, generate_answers, prompt_batches
from lit_rlhf.metrics import bootstrap_ci, interval_text
from lit_rlhf.environments import MultiTurn
from lit_rlhf.models import check_source, load_causal_lm, load_tokenizer, unwrap
from lit_rlhf.plugins import resolve
from lit_rlhf.precision import generation_precision as default_generation_precision
from lit_rlhf.reward_functions import REWARD_FUNCTIONS
from lit_rlhf.rows import as_messages, load_rows
from lit_rlhf.rollout_engines import MultiTurnRollout
from lit_rlhf.tools import tool_call_text

INSTRUCTION = "End your reply with a line 'Answer: <number>'."
OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
WORDS = {"+": "plus", "-": "minus", "*": "times"}
EXAMPLE = (23, "*", 41)  # the worked example of a problem with a tool


def question(a: int, op: str, b: int) -> str:
    """A problem as a plain prompt: what decides its split (`is_heldout`), with or without a tool."""
    return f"What is {a} {op} {b}? {INSTRUCTION}"


def tool_prompt(a: int, op: str, b: int) -> list[dict]:
    """A problem as chat messages that teach the `calculator` tool: a system turn saying how to call it, one worked
    example (a call, the tool's result, the answer), then the question, its operator in words (`times`): the
    example writes it as a symbol, the policy must write the expression the tool reads."""
    call = partial(tool_call_text, "calculator")
    system = f"You can use a calculator: write {call({'expression': '<expression>'})} and its result comes back. End with a line 'Answer: <number>'."
    x, x_op, y = EXAMPLE
    result = OPERATORS[x_op](x, y)
    return [{"role": "system", "content": system}, {"role": "user", "content": f"What is {x} {x_op} {y}?"},
            {"role": "assistant", "content": call({"expression": f"{x} {x_op} {y}"})}, {"role": "tool", "content": str(result)},
            {"role": "assistant", "content": f"Answer: {result}"}, {"role": "user", "content": f"What is {a} {WORDS[op]} {b}?"}]  # fmt: skip


def is_heldout(text: str, share: float) -> bool:
    """A problem's split, from a hash of its `question` text: the same on every machine and for every seed."""
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 10_000 < share * 10_000


def arithmetic(num_train: int = 500, num_heldout: int = 200, seed: int = 0, max_operand: int = 20, heldout_share: float = 0.3, ops: str = "+-",
               min_operand: int = 1, tool: Optional[Literal["calculator"]] = None) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """Distinct problems `a <op> b` (`prompt`, `answer`), drawn from two disjoint splits of all such problems.

    Args:
        num_train: Training problems.
        num_heldout: Held-out problems.
        seed: Seed of the draw (not of the split, which a hash of each problem decides).
        max_operand: Operands run from `min_operand` to this.
        heldout_share: Share of all problems in the held-out split.
        ops: The operators, of + - *.
        min_operand: The smallest operand.
        tool: `calculator`: each prompt teaches the calculator tool (`tool_prompt`: chat messages), for multi-turn
            rollouts with `--model.tools [calculator]`; a problem keeps its split with and without it.
    """
    if not ops or set(ops) - set(OPERATORS) or not 0 <= min_operand <= max_operand:
        raise UserError(f"--ops {ops!r} --min_operand {min_operand} --max_operand {max_operand}: operators of {''.join(OPERATORS)}, operands 0 <= min <= max")
    operands = range(min_operand, max_operand + 1)
    problems = [(a, op, b) for a in operands for b in operands for op in ops]
    heldout = [p for p in problems if is_heldout(question(*p), heldout_share)]
    train = [p for p in problems if not is_heldout(question(*p), heldout_share)]
    for flag, split, n in (("num_train", train, num_train), ("num_heldout", heldout, num_heldout)):
        if n > len(split):
            raise UserError(f"--{flag} {n}: its split holds {len(split)} of the {len(problems)} problems with operands {min_operand} to {max_operand}"
                            " (use a larger --max_operand or another --heldout_share)")  # fmt: skip
    rng = random.Random(seed)
    prompt = question if tool is None else tool_prompt
    return tuple([{"prompt": prompt(*p), "answer": OPERATORS[p[1]](p[0], p[2])} for p in rng.sample(split, n)] for split, n in ((train, num_train), (heldout, num_heldout)))


def write_arithmetic(args: Optional[list[str]] = None) -> None:
    parser = ArgumentParser(prog="lit-rlhf arithmetic", description="Write a verifiable arithmetic task: DIR/train.jsonl and DIR/heldout.jsonl.")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write")
    parser.add_function_arguments(arithmetic)
    cfg = parser.parse_args(args)
    train, heldout = arithmetic(**{k: v for k, v in cfg.as_dict().items() if k != 'out'})
    cfg.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("heldout", heldout)):
        (cfg.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{cfg.out}/train.jsonl ({len(train)} problems), {cfg.out}/heldout.jsonl ({len(heldout)})")


def judges(reward_funcs: list[str], flag: str) -> list[Callable]:
    """The reward functions `flag` names, imported now: a wrong name or path fails before any work starts."""
    return [resolve(spec, REWARD_FUNCTIONS, flag) for spec in reward_funcs]


def prompt_messages(row: dict, n: int) -> list[dict]:
    """Row `n`'s `prompt` (a string or chat messages) as checked chat messages."""
    return as_messages(row, "prompt", f"row {n}", "user")


@torch.no_grad()
def task_answers(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int, sample: bool = False, temperature: float = 1.0,
                 engine: Engine = "hf", multi_turn: Optional[MultiTurn] = None, progress: Optional[str] = None) -> list[dict]:  # fmt: skip
    """The model's answer to each row's `prompt`, greedy (or sampled at `temperature`), as `generate_answers` gives them;
    with `multi_turn`, `conversation_answers`. `progress`: the title of a progress bar on stderr (None: no bar)."""
    prompts = [tokenize(tokenizer, render_prompt(tokenizer, prompt_messages(row, n))) for n, row in enumerate(rows, start=1)]
    if multi_turn is None:
        return generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, sample, temperature, engine, progress=progress)
    return conversation_answers(model, tokenizer, rows, prompts, multi_turn, max_new_tokens, batch_size, temperature if sample else 0.0, progress)


def conversation_answers(model, tokenizer, rows: list[dict], prompts: list[list[int]], multi_turn: MultiTurn, max_new_tokens: int,
                         batch_size: int, temperature: float, progress: Optional[str] = None) -> list[dict]:  # fmt: skip
    """Each row's conversation with the environment or tools of `multi_turn`, from its tokenized prompt, by the multi-turn
    rollout engine (the `hf` loop; each policy turn at most `max_new_tokens`, greedy at `temperature` 0), `batch_size`
    rows at a time: as `generate_answers` gives answers (the whole conversation after the prompt), with `tool_calls` and
    `environment_reward` (None: none). `progress`: the title of a progress bar on stderr (None: no bar)."""
    decode = partial(tokenizer.decode, skip_special_tokens=True)
    engine, answers = MultiTurnRollout(SimpleNamespace(model=model, tokenizer=tokenizer, hparams=multi_turn, _trainer=None, decode=decode)), []
    for start, batch in prompt_batches(prompts, batch_size, tokenizer.pad_token_id, unwrap(model).device, progress):
        chunk = rows[start : start + batch_size]
        batch |= {"prompt_text": [prompt_messages(row, start + n)[-1]["content"] for n, row in enumerate(chunk, start=1)],
                  "columns": {key: [row.get(key) for row in chunk] for key in rows[0] if key != "prompt"}}  # fmt: skip
        samples = engine.sample(batch, 1, max_new_tokens, temperature)
        rewards = [None] * len(chunk) if samples.environment_rewards is None else samples.environment_rewards.tolist()
        for ids, mask, eos, calls, reward in zip(samples.responses, samples.response_mask, samples.contains_eos.tolist(), samples.episode["tool_calls"].tolist(), rewards):
            ids = ids[mask.bool()].tolist()
            answers.append({"response": ids, "text": decode(ids).strip(), "eos": eos, "tool_calls": calls,
                            "environment_reward": None if reward is None or math.isnan(reward) else reward})  # fmt: skip
    return answers


def task_passes(model, tokenizer, rows: list[dict], functions: list[Callable], max_new_tokens: int, batch_size: int, sample: bool = False,
                temperature: float = 1.0, engine: Engine = "hf") -> torch.Tensor:  # fmt: skip
    """(N,) 1.0 where the model's answer to row n's `prompt` passes: greedy (or sampled at `temperature`), judged
    by reward `functions` (`judges`; TRL's contract, the rows' other columns and `completion_ids` passed), a pass being a summed reward >= 1."""
    return passes(rows, task_answers(model, tokenizer, rows, max_new_tokens, batch_size, sample, temperature, engine), functions)


def passes(rows: list[dict], answers: list[dict], functions: list[Callable]) -> torch.Tensor:
    """(N,) 1.0 where `answers[n]` (`generate_answers`') to `rows[n]` (its `prompt` text and other columns) passes: the
    reward `functions` (TRL's contract; the rows' other columns and `completion_ids` passed) and, in a conversation
    with an environment, its reward sum to 1 or more (unweighted: `--model.reward_weights` is training's)."""
    columns = {key: [row.get(key) for row in rows] for key in rows[0] if key != "prompt"} | {"completion_ids": [a["response"] for a in answers]}
    completions = [answer["text"] for answer in answers]
    prompts = [messages[-1]["content"] for messages in map(prompt_messages, rows, range(1, len(rows) + 1))]  # the question, as in training
    scores = [f(prompts=prompts, completions=completions, **columns) for f in functions]
    scores.append([answer.get("environment_reward") for answer in answers])  # an environment's reward, a reward source as in training
    return torch.tensor([float(sum(s or 0.0 for s in row_scores) >= 1) for row_scores in zip(*scores)])


def task_accuracy(
    models: dict[str, str], dataset: str, reward_funcs: list[str] = ["final_number"], limit: int = 200, k: int = 8,
    max_new_tokens: int = 128, batch_size: int = 16, seed: int = 0, generation_precision: Optional[Literal["bf16", "fp32"]] = None,
    temperature: float = 1.0, generation_engine: Engine = "hf", environment: Optional[str] = None, tools: Optional[list[str]] = None,
    max_turns: int = MultiTurn.max_turns, max_rollout_tokens: int = MultiTurn.max_rollout_tokens, environment_timeout: float = MultiTurn.environment_timeout,
) -> dict:  # fmt: skip
    """Per model: greedy pass@1 (mean and bootstrap 95 % interval over problems) and pass@k of `k` answers
    sampled at `temperature`, on the first `limit` prompt rows of `dataset` (`task_passes`); for every model
    after the first, the `gain` of its greedy pass@1 over the first's, with a paired bootstrap interval
    (the per-problem differences resampled together); `greedy_passes`, the (N,) 0/1 of each problem, for other pairings.

    Answers are generated with `generation_precision` weights: by default bf16 where this machine
    has bf16 units (lit_rlhf/precision.py), else fp32, by `generation_engine` (`hf`, `vllm`, or `auto`: the
    fastest here, `generation.started_vllm`). With an `environment` or `tools` (and their limits, as the `--model.*`
    flags of lit-rlhf fit), each answer is a conversation with them, as in training (the `hf` engine, which `auto`
    takes; `max_new_tokens` a turn); the report adds each model's `tool_call_rate`, the share of greedy answers with a tool call."""
    check_ranges("", locals(), {"limit": "> 0", "k": "> 0", "max_new_tokens": "> 0", "batch_size": "> 0", "temperature": "> 0", "max_turns": "> 0",
                                "max_rollout_tokens": "> 0", "environment_timeout": "> 0"})  # fmt: skip
    multi_turn = MultiTurn(environment, tools, max_turns, max_rollout_tokens, environment_timeout) if environment or tools else None
    if environment and tools:
        raise UserError("--environment and --tools: give one (an environment answers every turn itself; it may call functions of its own)")
    if multi_turn is not None and generation_engine == "vllm":
        raise UserError("--generation_engine vllm: conversations with --environment or --tools run on the hf engine here (auto takes it)")
    loaded = load_rows(dataset)[:limit]
    for where, row in loaded:  # every prompt checked before any work starts, naming its file and row
        as_messages(row, "prompt", where, "user")
    rows = [row for _, row in loaded]
    for name, source in models.items():  # every model found and every judge imported before any work starts
        check_source(source, f"--models {name}")
    functions = judges(reward_funcs, "--reward_funcs")
    tokenizer = load_tokenizer(next(iter(models.values())))
    answers = partial(task_answers, tokenizer=tokenizer, rows=rows, max_new_tokens=max_new_tokens, batch_size=batch_size, engine=generation_engine,
                      multi_turn=multi_turn)  # fmt: skip
    precision, report, first = default_generation_precision(generation_precision), {}, None
    for name, path in models.items():
        model = load_causal_lm(path).eval().to(torch.bfloat16 if precision == "bf16" else torch.float32)
        greedy_answers = answers(model, progress=f"{name}: greedy answers")
        greedy = passes(rows, greedy_answers, functions)  # (N,)
        first = greedy if first is None else first
        torch.manual_seed(seed)
        sampled = torch.stack([passes(rows, answers(model, sample=True, temperature=temperature, progress=f"{name}: sample {i + 1} of {k}"), functions)
                               for i in range(k)])  # (k, N)
        report[name] = {"greedy": bootstrap_ci(greedy, seed=seed), f"pass@{k}": sampled.max(0).values.mean().item(),
                        "sampled_pass_rate": sampled.mean().item(), "gain": bootstrap_ci(greedy - first, seed=seed),
                        "problems": len(rows), "greedy_passes": greedy.tolist(), "max_new_tokens": max_new_tokens, "temperature": temperature, "generation_precision": precision,
                        "generation_engine": "hf" if multi_turn else generation_engine}  # fmt: skip
        if multi_turn is not None:
            report[name]["tool_call_rate"] = sum(a["tool_calls"] > 0 for a in greedy_answers) / len(rows)
        print(f"{name}: greedy pass@1 {interval_text(report[name]['greedy'])}, pass@{k} {report[name][f'pass@{k}']:.3f}", file=sys.stderr)
    return report


def main(args: Optional[list[str]] = None) -> dict:
    parser = ArgumentParser(prog="lit-rlhf task-accuracy", description=task_accuracy.__doc__.split("\n\n")[0], default_meta=False)
    parser.add_function_arguments(task_accuracy)
    cfg = parser.parse_args(args)
    report = task_accuracy(**cfg.as_dict())
    print(task_table(report, cfg.k))
    return report


def task_table(report: dict, k: int) -> str:
    """`task_accuracy`'s report as a markdown table."""
    first = next(iter(report))
    tools = "tool_call_rate" in report[first]
    lines = [f"| model | greedy pass@1 [95 % CI] | gain over {first} [95 % CI] | pass@{k} | sampled pass rate |" + " greedy answers with a tool call |" * tools,
             "| --- | --- | --- | --- | --- |" + " --- |" * tools]  # fmt: skip
    for name, r in report.items():
        gain = "" if name == first else interval_text(r["gain"])
        calls = f" {r['tool_call_rate']:.3f} |" if tools else ""
        lines.append(f"| {name} | {interval_text(r['greedy'])} | {gain} | {r[f'pass@{k}']:.3f} | {r['sampled_pass_rate']:.3f} |{calls}")
    r = report[first]
    return "\n".join(lines) + f"\n\n{r['problems']} problems, answers of at most {r['max_new_tokens']} tokens generated with {r['generation_precision']} weights, pass@{k} sampled at temperature {r['temperature']}."
