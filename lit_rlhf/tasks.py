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
from typing import Optional

import torch
from jsonargparse import ArgumentParser

from lit_rlhf.data import collate_prompts
from lit_rlhf.tokenization import render_prompt, tokenize
from lit_rlhf.errors import UserError, check_ranges
from lit_rlhf.forward import generate_responses
from lit_rlhf.metrics import bootstrap_ci, interval_text
from lit_rlhf.models import load_causal_lm, load_tokenizer
from lit_rlhf.reward_functions import reward_function
from lit_rlhf.rows import load_rows

INSTRUCTION = "End your reply with a line 'Answer: <number>'."


def arithmetic_problem(a: int, b: int, op: str) -> dict:
    return {"prompt": f"What is {a} {op} {b}? {INSTRUCTION}", "answer": a + b if op == "+" else a - b}


def is_heldout(problem: dict, share: float) -> bool:
    """The problem's split, from a hash of its text: the same on every machine and for every seed."""
    return int(hashlib.sha256(problem["prompt"].encode()).hexdigest(), 16) % 10_000 < share * 10_000


def arithmetic(num_train: int, num_heldout: int, seed: int = 0, digits: int = 2, heldout_share: float = 0.2) -> tuple[list[dict], list[dict]]:
    """`num_train` and `num_heldout` distinct problems `a + b` / `a - b` with `digits`-digit operands, drawn
    under `seed`, from disjoint splits of the problem space (`heldout_share` of it held out)."""
    low, high = 10 ** (digits - 1), 10**digits - 1
    space = (high - low + 1) ** 2 * 2
    if num_train + num_heldout > space * min(heldout_share, 1 - heldout_share):
        raise UserError(f"{num_train} + {num_heldout} problems do not fit the {space} {digits}-digit problems: use more --digits")
    rng, seen = random.Random(seed), set()
    train, heldout = [], []
    while len(train) < num_train or len(heldout) < num_heldout:
        problem = arithmetic_problem(rng.randint(low, high), rng.randint(low, high), rng.choice("+-"))
        split = heldout if is_heldout(problem, heldout_share) else train
        if problem["prompt"] not in seen and len(split) < (num_heldout if split is heldout else num_train):
            seen.add(problem["prompt"])
            split.append(problem)
    return train, heldout


def write_arithmetic(args: Optional[list[str]] = None) -> None:
    parser = ArgumentParser(prog="lit-rlhf arithmetic", description="Write a verifiable arithmetic task: DIR/train.jsonl and DIR/heldout.jsonl.")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write")
    parser.add_function_arguments(arithmetic)
    cfg = parser.parse_args(args)
    train, heldout = arithmetic(cfg.num_train, cfg.num_heldout, cfg.seed, cfg.digits, cfg.heldout_share)
    cfg.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("heldout", heldout)):
        (cfg.out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{cfg.out}/train.jsonl ({len(train)} problems), {cfg.out}/heldout.jsonl ({len(heldout)})")


@torch.no_grad()
def task_passes(model, tokenizer, rows: list[dict], reward_funcs: list[str], max_new_tokens: int, batch_size: int, sample: bool = False) -> torch.Tensor:
    """(N,) 1.0 where the model's answer to row n's `prompt` passes: greedy (or sampled at temperature 1), judged
    by `reward_funcs` (TRL's contract, the rows' other columns passed), a pass being a summed reward >= 1."""
    functions = [reward_function(spec) for spec in reward_funcs]
    sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
    out = []
    for start in range(0, len(rows), batch_size):
        part = rows[start : start + batch_size]
        prompts = [tokenize(tokenizer, render_prompt(tokenizer, [{"role": "user", "content": row["prompt"]}])) for row in part]
        batch = collate_prompts([{"prompt": p} for p in prompts], tokenizer.pad_token_id)
        responses, mask, _ = generate_responses(model, batch, tokenizer, max_new_tokens=max_new_tokens, **sampling)
        completions = [tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(responses, mask)]
        columns = {key: [row.get(key) for row in part] for key in part[0] if key != "prompt"}
        scores = [f(prompts=[row["prompt"] for row in part], completions=completions, **columns) for f in functions]
        out += [float(sum(s or 0.0 for s in row_scores) >= 1) for row_scores in zip(*scores)]
    return torch.tensor(out)


def task_accuracy(
    models: dict[str, str], dataset: str, reward_funcs: list[str] = ["final_number"], limit: int = 200, k: int = 8,
    max_new_tokens: int = 128, batch_size: int = 16, seed: int = 0,
) -> dict:  # fmt: skip
    """Per model: greedy pass@1 (mean and bootstrap 95 % interval over problems) and pass@k of `k` answers
    sampled at temperature 1, on the first `limit` prompt rows of `dataset` (`task_passes`)."""
    check_ranges("", locals(), {"limit": "> 0", "k": "> 0", "max_new_tokens": "> 0", "batch_size": "> 0"})
    rows = [row for _, row in load_rows(dataset)[:limit]]
    tokenizer = load_tokenizer(next(iter(models.values())))
    passes = partial(task_passes, tokenizer=tokenizer, rows=rows, reward_funcs=reward_funcs, max_new_tokens=max_new_tokens, batch_size=batch_size)
    report = {}
    for name, path in models.items():
        model = load_causal_lm(path).eval()
        greedy = passes(model)
        torch.manual_seed(seed)
        sampled = torch.stack([passes(model, sample=True) for _ in range(k)])  # (k, N)
        report[name] = {"pass@1": bootstrap_ci(greedy, seed=seed), f"pass@{k}": sampled.max(0).values.mean().item(),
                        "sampled_pass_rate": sampled.mean().item()}  # fmt: skip
        print(f"{name}: greedy pass@1 {interval_text(report[name]['pass@1'])}, pass@{k} {report[name][f'pass@{k}']:.3f}", file=sys.stderr)
    return report


def main(args: Optional[list[str]] = None) -> dict:
    parser = ArgumentParser(prog="lit-rlhf task-accuracy", description=task_accuracy.__doc__.split("\n\n")[0], default_meta=False)
    parser.add_function_arguments(task_accuracy)
    cfg = parser.parse_args(args)
    report = task_accuracy(**cfg.as_dict())
    k = cfg.k
    print(f"| model | greedy pass@1 [95 % CI] | pass@{k} | sampled pass rate |\n| --- | --- | --- | --- |")
    for name, r in report.items():
        print(f"| {name} | {r['pass@1'][0]:.3f} [{r['pass@1'][1]:.3f}, {r['pass@1'][2]:.3f}] | {r[f'pass@{k}']:.3f} | {r['sampled_pass_rate']:.3f} |")
    return report
