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
import random
import sys
from functools import partial
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from jsonargparse import ArgumentParser

from lit_rlhf.tokenization import render_prompt, tokenize
from lit_rlhf.errors import UserError, check_ranges
from lit_rlhf.generation import Engine, generate_answers
from lit_rlhf.metrics import bootstrap_ci, interval_text
from lit_rlhf.models import check_source, load_causal_lm, load_tokenizer
from lit_rlhf.plugins import resolve
from lit_rlhf.precision import generation_precision as default_generation_precision
from lit_rlhf.reward_functions import REWARD_FUNCTIONS
from lit_rlhf.rows import load_rows

INSTRUCTION = "End your reply with a line 'Answer: <number>'."


def arithmetic_problem(a: int, b: int, op: str) -> dict:
    return {"prompt": f"What is {a} {op} {b}? {INSTRUCTION}", "answer": a + b if op == "+" else a - b}


def is_heldout(problem: dict, share: float) -> bool:
    """The problem's split, from a hash of its text: the same on every machine and for every seed."""
    return int(hashlib.sha256(problem["prompt"].encode()).hexdigest(), 16) % 10_000 < share * 10_000


def arithmetic(num_train: int = 500, num_heldout: int = 200, seed: int = 0, max_operand: int = 20, heldout_share: float = 0.3) -> tuple[list[dict], list[dict]]:
    """Distinct problems `a + b` and `a - b`, drawn from two disjoint splits of all such problems.

    Args:
        num_train: Training problems.
        num_heldout: Held-out problems.
        seed: Seed of the draw (not of the split, which a hash of each problem decides).
        max_operand: Operands run from 1 to this.
        heldout_share: Share of all problems in the held-out split.
    """
    problems = [arithmetic_problem(a, b, op) for a in range(1, max_operand + 1) for b in range(1, max_operand + 1) for op in "+-"]
    heldout = [p for p in problems if is_heldout(p, heldout_share)]
    train = [p for p in problems if not is_heldout(p, heldout_share)]
    for flag, split, n in (("num_train", train, num_train), ("num_heldout", heldout, num_heldout)):
        if n > len(split):
            raise UserError(f"--{flag} {n}: its split holds {len(split)} of the {len(problems)} problems with operands up to {max_operand}"
                            " (use a larger --max_operand or another --heldout_share)")  # fmt: skip
    rng = random.Random(seed)
    return rng.sample(train, num_train), rng.sample(heldout, num_heldout)


def write_arithmetic(args: Optional[list[str]] = None) -> None:
    parser = ArgumentParser(prog="lit-rlhf arithmetic", description="Write a verifiable arithmetic task: DIR/train.jsonl and DIR/heldout.jsonl.")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write")
    parser.add_function_arguments(arithmetic)
    cfg = parser.parse_args(args)
    train, heldout = arithmetic(cfg.num_train, cfg.num_heldout, cfg.seed, cfg.max_operand, cfg.heldout_share)
    cfg.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("heldout", heldout)):
        (cfg.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{cfg.out}/train.jsonl ({len(train)} problems), {cfg.out}/heldout.jsonl ({len(heldout)})")


def judges(reward_funcs: list[str], flag: str) -> list[Callable]:
    """The reward functions `flag` names, imported now: a wrong name or path fails before any work starts."""
    return [resolve(spec, REWARD_FUNCTIONS, flag) for spec in reward_funcs]


@torch.no_grad()
def task_passes(model, tokenizer, rows: list[dict], functions: list[Callable], max_new_tokens: int, batch_size: int, sample: bool = False,
                temperature: float = 1.0, engine: Engine = "hf") -> torch.Tensor:  # fmt: skip
    """(N,) 1.0 where the model's answer to row n's `prompt` passes: greedy (or sampled at `temperature`), judged
    by reward `functions` (`judges`; TRL's contract, the rows' other columns and `completion_ids` passed), a pass being a summed reward >= 1."""
    prompts = [tokenize(tokenizer, render_prompt(tokenizer, [{"role": "user", "content": row["prompt"]}])) for row in rows]
    return passes(rows, generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, sample, temperature, engine), functions)


def passes(rows: list[dict], answers: list[dict], functions: list[Callable]) -> torch.Tensor:
    """(N,) 1.0 where `answers[n]` (`generate_answers`') to `rows[n]` (its `prompt` text and other columns) passes: the
    reward `functions` (TRL's contract; the rows' other columns and `completion_ids` passed) sum to 1 or more."""
    columns = {key: [row.get(key) for row in rows] for key in rows[0] if key != "prompt"} | {"completion_ids": [a["response"] for a in answers]}
    completions = [answer["text"] for answer in answers]
    scores = [f(prompts=[row["prompt"] for row in rows], completions=completions, **columns) for f in functions]
    return torch.tensor([float(sum(s or 0.0 for s in row_scores) >= 1) for row_scores in zip(*scores)])


def task_accuracy(
    models: dict[str, str], dataset: str, reward_funcs: list[str] = ["final_number"], limit: int = 200, k: int = 8,
    max_new_tokens: int = 128, batch_size: int = 16, seed: int = 0, generation_precision: Optional[Literal["bf16", "fp32"]] = None,
    temperature: float = 1.0, generation_engine: Engine = "hf",
) -> dict:  # fmt: skip
    """Per model: greedy pass@1 (mean and bootstrap 95 % interval over problems) and pass@k of `k` answers
    sampled at `temperature`, on the first `limit` prompt rows of `dataset` (`task_passes`); for every model
    after the first, the `gain` of its greedy pass@1 over the first's, with a paired bootstrap interval
    (the per-problem differences resampled together); `greedy_passes`, the (N,) 0/1 of each problem, for other pairings.

    Answers are generated with `generation_precision` weights: by default bf16 where this machine
    has bf16 units (lit_rlhf/precision.py), else fp32, by `generation_engine` (`hf`, `vllm`, or `auto`: the
    fastest here, `generation.started_vllm`)."""
    check_ranges("", locals(), {"limit": "> 0", "k": "> 0", "max_new_tokens": "> 0", "batch_size": "> 0", "temperature": "> 0"})
    rows = [row for _, row in load_rows(dataset)[:limit]]
    for name, source in models.items():  # every model found and every judge imported before any work starts
        check_source(source, f"--models {name}")
    functions = judges(reward_funcs, "--reward_funcs")
    tokenizer = load_tokenizer(next(iter(models.values())))
    passes = partial(task_passes, tokenizer=tokenizer, rows=rows, functions=functions, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     engine=generation_engine)
    precision, report, first = default_generation_precision(generation_precision), {}, None
    for name, path in models.items():
        model = load_causal_lm(path).eval().to(torch.bfloat16 if precision == "bf16" else torch.float32)
        greedy = passes(model)  # (N,)
        first = greedy if first is None else first
        torch.manual_seed(seed)
        sampled = torch.stack([passes(model, sample=True, temperature=temperature) for _ in range(k)])  # (k, N)
        report[name] = {"greedy": bootstrap_ci(greedy, seed=seed), f"pass@{k}": sampled.max(0).values.mean().item(),
                        "sampled_pass_rate": sampled.mean().item(), "gain": bootstrap_ci(greedy - first, seed=seed),
                        "problems": len(rows), "greedy_passes": greedy.tolist(), "max_new_tokens": max_new_tokens, "temperature": temperature, "generation_precision": precision,
                        "generation_engine": generation_engine}  # fmt: skip
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
    lines = [f"| model | greedy pass@1 [95 % CI] | gain over {first} [95 % CI] | pass@{k} | sampled pass rate |", "| --- | --- | --- | --- | --- |"]
    for name, r in report.items():
        gain = "" if name == first else interval_text(r["gain"])
        lines.append(f"| {name} | {interval_text(r['greedy'])} | {gain} | {r[f'pass@{k}']:.3f} | {r['sampled_pass_rate']:.3f} |")
    r = report[first]
    return "\n".join(lines) + f"\n\n{r['problems']} problems, answers of at most {r['max_new_tokens']} tokens generated with {r['generation_precision']} weights, pass@{k} sampled at temperature {r['temperature']}."
