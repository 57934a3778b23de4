"""`lit-rlhf evaluate`: compare causal LMs side by side with a reward model and held-out data.

Report sections (report.md, report.json, and TensorBoard under `output_dir`):
1. mean answer log-prob per model on the preference data's chosen answers and on an unseen
   instruction set (default databricks/databricks-dolly-15k);
2. greedy generations of every model on the same prompts;
3. reward-model accuracy (chosen > rejected) and mean margin;
4. per model: mean reward of its generations, win-rate against the first model, greedy
   log-ratio to the first model on its own responses, share of responses with assistant boilerplate.
"""

import json
import re
import sys
import time
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from torch.utils.data import DataLoader

from lit_rlhf.data import PreferenceDataModule, collate_prompts, collate_sequences, encode_row, load_rows, render_prompt, tokenize
from lit_rlhf.errors import UserError, check_ranges
from lit_rlhf.forward import sequence_logps, sequence_scores
from lit_rlhf.models import check_same_vocabulary, load_causal_lm, load_scalar_model, load_tokenizer
from lit_rlhf.ops import truncate_after_eos

DEFAULT_PROMPTS = [
    "What's your morning routine like?",
    "Can you tell me about a memorable birthday or celebration you've had?",
    "Do you have a favorite type of vacation or getaway?",
]
BOILERPLATE = re.compile(
    r"as a digital ai assistant|as an ai\b|i don'?t have personal|i do not have personal|"
    r"i'?m an artificial intelligence|i am an artificial intelligence|as a language model|as an artificial intelligence|as a chatbot",
    re.IGNORECASE,
)


def boilerplate_share(texts: list[str]) -> float:
    """Share of `texts` with assistant boilerplate ("As an AI", "I don't have personal ...")."""
    return sum(bool(BOILERPLATE.search(t)) for t in texts) / max(1, len(texts))


def win_rate(scores: torch.Tensor, baseline_scores: torch.Tensor) -> float:
    """Share of prompts where `scores` beats `baseline_scores` (ties count one half). (N,), (N,) -> float"""
    return ((scores > baseline_scores).float() + 0.5 * (scores == baseline_scores).float()).mean().item()


@torch.no_grad()
def over_batches(fn, model, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> torch.Tensor:
    """`fn(model, batch)` (`sequence_logps` or `sequence_scores`) over (prompt, completion) token-id pairs,
    in right-padded batches of `batch_size`. -> (N,)"""
    loader = DataLoader(pairs, batch_size=batch_size, collate_fn=partial(collate_sequences, pad_id=pad_id))
    return torch.cat([fn(model, batch) for batch in loader])


def mean_answer_logprob(model, rows: list[dict], pad_id: int, batch_size: int) -> float:
    """Mean over rows of the mean log-prob of the answer tokens given the chat-formatted prompt.

    `rows` hold token ids: `prompt` and `chosen` (the answer).
    """
    pairs = [(r["prompt"], r["chosen"]) for r in rows]
    lengths = torch.tensor([len(answer) for _, answer in pairs])
    return (over_batches(sequence_logps, model, pairs, pad_id, batch_size) / lengths).mean().item()


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, batch_size: int) -> list[dict]:
    """Greedy responses: for each prompt its `response` ids (cut after EOS) and text."""
    out = []
    for start in range(0, len(prompt_ids), batch_size):
        batch = collate_prompts([{"prompt": p} for p in prompt_ids[start : start + batch_size]], tokenizer.pad_token_id)
        seqs = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
        responses, mask, _ = truncate_after_eos(seqs[:, batch["input_ids"].shape[1] :], tokenizer.eos_token_id, tokenizer.pad_token_id)
        for r, m in zip(responses, mask):
            ids = r[m.bool()].tolist()
            out.append({"response": ids, "text": tokenizer.decode(ids, skip_special_tokens=True).strip()})
    return out


def unseen_rows(dataset: str, tokenizer, limit: int, max_length: int) -> list[dict]:
    """Instruction rows (`instruction`, optional `context`, `response`) as prompt/chosen token ids."""
    rows = []
    for where, row in load_rows(dataset)[:limit]:
        if not isinstance(row, dict) or not row.get("instruction") or not row.get("response"):
            raise UserError(f"{where}: an unseen-set row needs non-empty 'instruction' and 'response'")
        prompt = row["instruction"] + (f"\n\n{row['context']}" if row.get("context") else "")
        rows.append(encode_row(tokenizer, {"prompt": prompt, "chosen": row["response"]}, where, ("chosen",), max_length, max_length // 2))
    return rows


def evaluate(
    models: dict[str, str],
    reward_model: str,
    data: dict,
    unseen_dataset: str = "databricks/databricks-dolly-15k",
    output_dir: str = "logs/evaluate",
    prompts: list[str] = DEFAULT_PROMPTS,
    num_generation_prompts: int = 32,
    max_new_tokens: int = 128,
    num_rows: int = 400,
    num_logprob_rows: int = 200,
    batch_size: int = 8,
) -> dict:
    """Evaluate causal LMs side by side and write report.md / report.json / TensorBoard to `output_dir`.

    Args:
        models: Name -> hub id, local folder or run folder (`logs/dpo/version_0/hf`); the first
            is the baseline for win-rate and log-ratio. YAML mapping, or on the command line
            `--models '{base: PATH, dpo: PATH}'`.
        reward_model: Reward model folder that scores generations and preference pairs.
        data: The preference data (`--data.*`, as for training: the same flags give the same held-out split).
        unseen_dataset: Instruction set not trained on (`instruction`, optional `context`, `response`):
            hub id or local file.
        output_dir: Where the report goes.
        prompts: Prompts every model answers, listed first in the report.
        num_generation_prompts: Prompts for reward, win-rate, log-ratio and boilerplate: the listed ones,
            then held-out preference prompts.
        max_new_tokens: Greedy generation length.
        num_rows: Held-out preference pairs for reward-model accuracy and margin.
        num_logprob_rows: Rows of each set for the mean answer log-prob.
        batch_size: Rows per forward pass.
    """
    check_ranges("", locals(), {"num_generation_prompts": "> 0", "max_new_tokens": "> 0", "num_rows": "> 0",
                                "num_logprob_rows": "> 0", "batch_size": "> 0"})  # fmt: skip
    if not models:
        raise UserError("pass at least one model: --models '{base: HuggingFaceTB/SmolLM-135M-Instruct}'")
    start = time.time()
    names, baseline = list(models), next(iter(models))
    tokenizer = load_tokenizer(models[baseline])
    pad_id = tokenizer.pad_token_id
    for what, source in [("--reward_model", reward_model)] + [(f"model '{n}'", models[n]) for n in names[1:]]:
        check_same_vocabulary(tokenizer, source, what)
    rm = load_scalar_model(reward_model, pad_id, trained_head=True).eval()
    dm = PreferenceDataModule(**{**data, "tokenizer_name_or_path": models[baseline], "mode": "pairs"})
    dm.setup("validate")
    held_out = dm.val_rows  # rows a run with the same --data.* flags did not train on
    extra = held_out[: max(0, num_generation_prompts - len(prompts))]
    prompt_texts = prompts + [r["prompt_text"] for r in extra]
    gen_prompts = [tokenize(tokenizer, render_prompt(tokenizer, [{"role": "user", "content": p}])) for p in prompts]
    gen_prompts += [r["prompt"] for r in extra]
    unseen = unseen_rows(unseen_dataset, tokenizer, num_logprob_rows, dm.hparams.max_length)

    pairs = held_out[:num_rows]
    chosen = over_batches(sequence_scores, rm, [(r["prompt"], r["chosen"]) for r in pairs], pad_id, batch_size)
    rejected = over_batches(sequence_scores, rm, [(r["prompt"], r["rejected"]) for r in pairs], pad_id, batch_size)
    report = {
        "reward_model": {"path": reward_model, "rows": len(pairs), "accuracy": (chosen > rejected).float().mean().item(),
                         "margin": (chosen - rejected).mean().item()},
        "prompts": prompt_texts,
        "models": {},
    }  # fmt: skip
    base_model = load_causal_lm(models[baseline]).eval()
    base_scores = None
    for name in names:
        model = base_model if name == baseline else load_causal_lm(models[name]).eval()
        gens = generate(model, tokenizer, gen_prompts, max_new_tokens, batch_size)
        answered = [(p, g["response"]) for p, g in zip(gen_prompts, gens)]
        scores = over_batches(sequence_scores, rm, answered, pad_id, batch_size)
        base_scores = scores if base_scores is None else base_scores
        logratio = over_batches(sequence_logps, model, answered, pad_id, batch_size) - over_batches(
            sequence_logps, base_model, answered, pad_id, batch_size
        )  # (N,) log pi(y|x) - log pi_base(y|x) on the model's own greedy y
        report["models"][name] = {
            "path": models[name],
            "logprob_preference": mean_answer_logprob(model, held_out[:num_logprob_rows], pad_id, batch_size),
            "logprob_unseen": mean_answer_logprob(model, unseen, pad_id, batch_size),
            "reward": scores.mean().item(),
            "win_rate": win_rate(scores, base_scores),
            "greedy_logratio": logratio.mean().item(),
            "boilerplate": boilerplate_share([g["text"] for g in gens]),
            "generations": [g["text"] for g in gens],
        }
        print(f"evaluated {name}: reward {report['models'][name]['reward']:.3f}", file=sys.stderr)
    report["seconds"] = round(time.time() - start, 1)
    write_report(report, Path(output_dir), baseline, unseen_dataset, data["dataset"])
    return report


def markdown(report: dict, baseline: str, unseen: str, dataset: str) -> str:
    rm = report["reward_model"]
    lines = [
        "# lit-rlhf evaluation", "",
        f"Preference data: `{dataset}` (held-out split); unseen set: `{unseen}`; reward model: `{rm['path']}`.", "",
        "## Models", "",
        f"| model | mean answer log-prob (preference) | mean answer log-prob (unseen) | reward | win-rate vs {baseline} | greedy log-ratio to {baseline} | boilerplate |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for name, m in report["models"].items():
        lines.append(
            f"| {name} | {m['logprob_preference']:.4f} | {m['logprob_unseen']:.4f} | {m['reward']:.3f} |"
            f" {m['win_rate']:.2f} | {m['greedy_logratio']:.3f} | {m['boilerplate']:.0%} |"
        )
    lines += [
        "", "Reward, win-rate, greedy log-ratio and boilerplate share are over the"
        f" {len(report['prompts'])} prompts below. The greedy log-ratio is `log p_model(y|x) - log p_{baseline}(y|x)`",
        "summed over the tokens of each model's own greedy response y, averaged over prompts: a KL-like distance",
        "that is not a KL estimate (greedy, not sampled, responses) and can be negative.", "",
        "## Reward model", "",
        f"Accuracy (chosen > rejected) {rm['accuracy']:.1%}, mean margin {rm['margin']:.3f}, over {rm['rows']} held-out rows.", "",
        "## Generations (greedy)", "",
    ]  # fmt: skip
    for i, prompt in enumerate(report["prompts"]):
        lines += [f"### {i + 1}. {prompt.strip()}", ""]
        lines += [f"- **{name}**: {m['generations'][i]}" for name, m in report["models"].items()] + [""]
    lines.append(f"Evaluation took {report['seconds']:.0f} s.")
    return "\n".join(lines)


def write_report(report: dict, output_dir: Path, baseline: str, unseen: str, dataset: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    output_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(report, baseline, unseen, dataset)
    (output_dir / "report.md").write_text(text)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2))
    with SummaryWriter(str(output_dir)) as writer:
        writer.add_text("report", text)
        writer.add_scalar("reward_model/accuracy", report["reward_model"]["accuracy"])
        for name, m in report["models"].items():
            for key in ("logprob_preference", "logprob_unseen", "reward", "win_rate", "greedy_logratio", "boilerplate"):
                writer.add_scalar(f"{name}/{key}", m[key])
    print(f"report: {(output_dir / 'report.md').resolve()}")


def main(args: Optional[list[str]] = None) -> dict:
    parser = ArgumentParser(prog="lit-rlhf evaluate", description=__doc__.split("\n\n")[0], default_meta=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML config; every key is also a flag")
    parser.add_class_arguments(PreferenceDataModule, "data", skip={"tokenizer_name_or_path", "mode"})
    parser.add_function_arguments(evaluate, skip={"data"})
    cfg = parser.parse_args(args)
    kwargs = {k: v for k, v in cfg.as_dict().items() if k not in ("config", "data")}
    return evaluate(data=cfg.data.as_dict(), **kwargs)
