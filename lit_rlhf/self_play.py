"""`lit-rlhf self-play-pairs`: preference rows whose rejected answer is the model's own (SPIN).

Self-Play Fine-Tuning (Chen et al. 2024, "Self-Play Fine-Tuning Converts Weak Language Models to Strong Language
Models") trains with DPO's loss on pairs whose chosen answer is a human one and whose rejected answer is the model's
own answer to the same prompt. The policy then learns away from what it does now, towards the preferred answers: on
this project's data, away from SmolLM2's greedy answers, which mostly loop and run to the length limit,
where a dataset's rejected answers (a formal assistant's, which end) teach neither (docs/results.md).

The rows keep their order, their prompts and their chosen answers: `--data.limit` and `--data.val_size` split them
as they split the rows they came from, so a stage that trains on them holds out the same prompts.
"""

import json
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import torch
from jsonargparse import ArgumentParser

from lit_rlhf.atomic import written_atomically
from lit_rlhf.errors import UserError, check_ranges
from lit_rlhf.generation import Engine
from lit_rlhf.models import check_source, load_causal_lm, load_tokenizer
from lit_rlhf.precision import generation_precision as default_generation_precision
from lit_rlhf.rows import load_rows
from lit_rlhf.tasks import task_answers
from lit_rlhf.tokenization import row_messages


def self_play_pairs(
    model: str, dataset: str, output: str, limit: Optional[int] = None, max_new_tokens: int = 256, batch_size: int = 64,
    temperature: float = 0.0, seed: int = 0, generation_precision: Optional[Literal["bf16", "fp32"]] = None,
    generation_engine: Engine = "auto",
) -> dict:  # fmt: skip
    """Write the first `limit` rows of `dataset` to `output`, each rejected answer replaced by the model's own.

    Each row's `rejected` becomes `model`'s answer to its prompt (`rejected_source` "model"). An answer the model ends
    at once (empty) leaves the row's own rejected answer (`rejected_source` "dataset"), counted in the summary: an
    empty completion is no answer to learn away from. Returns the summary: rows, answers that ended with EOS, rows left
    as they were.

    Args:
        model: The model whose answers become the rejected ones (the policy DPO will start from).
        dataset: Preference rows (`prompt`, `chosen`, `rejected`), as `--data.dataset` takes them.
        output: The .jsonl file to write; an existing file is refused (nothing is overwritten).
        limit: Only the first N rows, as `--data.limit` (the rows after them are not needed by a stage that reads N).
        max_new_tokens: Longest answer; an answer cut here is written as it stands (it did not end).
        batch_size: Prompts answered together.
        temperature: 0: greedy, the answers an evaluation sees; above 0: sampled at this temperature.
        seed: Seed of the sampling.
        generation_precision: The model's weights while generating: bf16 where this machine has bf16 units, else fp32.
        generation_engine: `hf`, `vllm`, or `auto` (the fastest here: lit_rlhf/generation.py).
    """
    check_ranges("", locals(), {"limit": "> 0", "max_new_tokens": "> 0", "batch_size": "> 0", "temperature": ">= 0"})
    output = Path(output)
    if output.exists():
        raise UserError(f"--output {output} exists; delete it or name another file (nothing is overwritten)")
    check_source(model, "--model")
    loaded = load_rows(dataset)[:limit]
    for where, row in loaded:  # every row checked before any answer is generated, naming its file and row
        row_messages(row, where, ("chosen", "rejected"))
    rows = [row for _, row in loaded]
    precision = default_generation_precision(generation_precision)
    tokenizer, policy = load_tokenizer(model), load_causal_lm(model).eval().to(torch.bfloat16 if precision == "bf16" else torch.float32)
    torch.manual_seed(seed)
    answers = task_answers(policy, tokenizer, rows, max_new_tokens, batch_size, temperature > 0, temperature or 1.0, generation_engine, progress="answers")
    kept = 0
    with written_atomically(output) as partial, open(partial, "w") as f:
        for row, answer in zip(rows, answers):
            mine = bool(answer["text"])
            kept += not mine
            replaced = {"rejected": answer["text"], "rejected_source": "model"} if mine else {"rejected_source": "dataset"}
            f.write(json.dumps(row | replaced) + "\n")
    return {"rows": len(rows), "ended": sum(a["eos"] for a in answers), "kept_dataset_rejected": kept, "output": str(output)}


def main(args: Optional[list[str]] = None) -> dict:
    parser = ArgumentParser(prog="lit-rlhf self-play-pairs", description=__doc__.split("\n\n")[0].split(": ", 1)[1], default_meta=False)
    parser.add_function_arguments(self_play_pairs)
    cfg = parser.parse_args(args)
    start = time.time()
    summary = self_play_pairs(**cfg.as_dict())
    print(f"{summary['output']}: {summary['rows']} rows in {time.time() - start:.0f} s; the model's answers ended in {summary['ended']},"
          f" {summary['kept_dataset_rejected']} empty answers left the dataset's rejected answer", file=sys.stderr)  # fmt: skip
    return summary
