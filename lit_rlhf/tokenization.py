"""Preference rows to token ids: the chat template, truncation, and a cache keyed by everything the tokens depend on."""

import os
from functools import partial
from pathlib import Path
from typing import Literal, Optional

from lightning.pytorch.utilities import rank_zero_warn

from lit_rlhf.errors import UserError
from lit_rlhf.rows import as_messages

CODE = Path(__file__).read_bytes()  # part of the tokenized rows' cache key: a change here tokenizes again


def render_prompt(tokenizer, prompt: list[dict]) -> str:
    """The prompt in the tokenizer's chat template, ending with the assistant's generation prompt."""
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def render_completion(tokenizer, prompt: list[dict], completion: list[dict]) -> str:
    """What the template adds after `render_prompt(prompt)` for `completion`, ending in the end-of-turn token."""
    prompt_text = render_prompt(tokenizer, prompt)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise UserError("the tokenizer's chat template does not render the prompt as a prefix of the conversation")
    return full_text[len(prompt_text) :].rstrip()


def tokenize(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_messages(
    tokenizer,
    prompt: list[dict],
    completions: dict[str, list[dict]],
    max_length: int,
    max_prompt_length: int,
    truncation: Literal["truncate", "drop"] = "truncate",
) -> Optional[dict]:
    """Token ids of a checked `prompt` and each of `completions` (chat messages); None if dropped.

    Over a limit, `truncate` keeps the prompt's last `max_prompt_length` tokens and each
    completion's first tokens up to `max_length`; `drop` returns None. The result also holds
    `truncated` and `prompt_text` (the last user turn, for reports).
    """
    ids = {"prompt": tokenize(tokenizer, render_prompt(tokenizer, prompt))}
    for k, completion in completions.items():
        ids[k] = tokenize(tokenizer, render_completion(tokenizer, prompt, completion))
    too_long = len(ids["prompt"]) > max_prompt_length or any(len(ids["prompt"]) + len(ids[k]) > max_length for k in completions)
    if too_long and truncation == "drop":
        return None
    ids["prompt"] = ids["prompt"][-max_prompt_length:]
    for k in completions:
        ids[k] = ids[k][: max_length - len(ids["prompt"])]
    ids["truncated"] = too_long
    ids["prompt_text"] = prompt[-1]["content"]
    return ids


def row_messages(row, where: str, completions: tuple[str, ...]) -> dict[str, list[dict]]:
    """`prompt` and each field named in `completions` of one row as checked chat messages."""
    return {k: as_messages(row, k, where, "user" if k == "prompt" else "assistant") for k in ("prompt", *completions)}


def encode_row(
    tokenizer,
    row: dict,
    where: str,
    completions: tuple[str, ...],
    max_length: int,
    max_prompt_length: int,
    truncation: Literal["truncate", "drop"] = "truncate",
) -> Optional[dict]:
    """Token ids of one row (`encode_messages` of its checked messages); a bad row raises a UserError
    naming `where` and the field."""
    messages = row_messages(row, where, completions)
    prompt = messages.pop("prompt")
    return encode_messages(tokenizer, prompt, messages, max_length, max_prompt_length, truncation)


#: the completion fields each mode reads
COMPLETIONS = {"pairs": ("chosen", "rejected"), "unpaired": ("completion",), "prompts": ()}


def encode_batch(batch: dict[str, list], indices: list[int], tokenizer, completions: tuple[str, ...], extra_columns: tuple[str, ...],
                 **limits) -> dict[str, list]:  # fmt: skip
    """The batched `Dataset.map` function: columns of checked chat messages (`prompt` and the completions)
    in, columns of token ids out (`encode_messages` with `limits`); dropped rows are left out, and each kept
    row says which row it came from (`source`). The `extra_columns` (an unpaired row's `label`, a prompt
    row's `answer`, ...) are passed through."""
    encoded = [encode_messages(tokenizer, p, {k: batch[k][i] for k in completions}, **limits) for i, p in enumerate(batch["prompt"])]
    encoded = [e if e is None else e | {"source": source} | {k: batch[k][i] for k in extra_columns} for i, (e, source) in enumerate(zip(encoded, indices))]
    kept = [e for e in encoded if e is not None]
    return {k: [e[k] for e in kept] for k in ("prompt", *completions, "truncated", "prompt_text", "source", *extra_columns)}


def unpaired_rows(rows: list[tuple[str, dict]], split_pairs: bool) -> list[tuple[str, dict]]:
    """Rows of `prompt`, `completion` and a boolean `label` (true: desirable), checked; with `split_pairs`,
    each (prompt, chosen, rejected) row becomes a desirable and an undesirable row."""
    out = []
    for where, row in rows:
        if split_pairs:
            messages = row_messages(row, where, ("chosen", "rejected"))
            out += [(f"{where} (chosen)", {"prompt": messages["prompt"], "completion": messages["chosen"], "label": True}),
                    (f"{where} (rejected)", {"prompt": messages["prompt"], "completion": messages["rejected"], "label": False})]  # fmt: skip
            continue
        label = row.get("label") if isinstance(row, dict) else None
        if not isinstance(label, bool):
            hint = "; preference pairs: pass --data.split_pairs true" if isinstance(row, dict) and "chosen" in row else ""
            raise UserError(f"{where}: field 'label' must be true (desirable) or false (undesirable), got {label!r}{hint}")
        out.append((where, dict(row_messages(row, where, ("completion",)), label=label)))
    return out


def cache_dir(kind: str) -> Path:
    """The folder of lit-rlhf's cached work of one `kind` (`tokenized` rows, DPO `ref_logps`):
    `<datasets' cache>/lit_rlhf/<kind>`, datasets' cache being `HF_DATASETS_CACHE` (default
    ~/.cache/huggingface/datasets)."""
    import datasets.config

    return Path(datasets.config.HF_DATASETS_CACHE) / "lit_rlhf" / kind


def tokenize_cached(rows: list[tuple[str, dict]], tokenizer, completions: tuple[str, ...], num_proc: int, **limits):
    """Token ids of `rows` (`encode_batch`), computed once: `(dataset, fingerprint, from_cache)`.

    The rows are checked here, in this process, so that a bad one stops the run naming file, row and
    field. Rendering and tokenizing go through `Dataset.map` (`num_proc` processes) and its on-disk
    cache, `cache_dir("tokenized")/<fingerprint>*.arrow`. The fingerprint hashes everything the tokens
    depend on: the checked rows themselves (so the file's content, `offset` and `limit`), the
    tokenizer (vocabulary, settings, chat template), the completions (mode), `limits` (`max_length`,
    `max_prompt_length`, `truncation`) and this file's code. Another run with the same fingerprint
    reads the cache instead of tokenizing.
    """
    import datasets
    from datasets.fingerprint import Hasher

    columns = {k: [] for k in ("prompt", *completions)}
    for where, row in rows:
        for k, messages in row_messages(row, where, completions).items():
            columns[k].append(messages)
    # passed through: an unpaired row's label (checked by `unpaired_rows`); every other column of a prompt row
    extra_columns = tuple(k for k in (rows[0][1] if rows and isinstance(rows[0][1], dict) else {}) if k == "label" or (not completions and k != "prompt"))
    for k in extra_columns:
        columns[k] = [row.get(k) for _, row in rows]
    source = datasets.Dataset.from_dict(columns)
    fingerprint = Hasher.hash([source._fingerprint, Hasher.hash(tokenizer), completions, sorted(limits.items()), CODE])
    cache_file = cache_dir("tokenized") / f"{fingerprint}.arrow"
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        writable = os.access(cache_file.parent, os.W_OK)
    except OSError:
        writable = False
    if not writable:  # a shared, read-only cache: tokenize in memory
        rank_zero_warn(f"{cache_file.parent} is not writable: the rows are tokenized in memory and not cached (set HF_DATASETS_CACHE to a writable folder)")
    from_cache = writable and datasets.is_caching_enabled() and any(cache_file.parent.glob(f"{fingerprint}*.arrow"))
    ids, truncated, text = datasets.List(datasets.Value("int32")), datasets.Value("bool"), datasets.Value("string")
    features = datasets.Features({"prompt": ids, **{k: ids for k in completions}, "truncated": truncated, "prompt_text": text,
                                  "source": datasets.Value("int64"), **{k: source.features[k] for k in extra_columns}})  # fmt: skip
    encoded = source.map(
        partial(encode_batch, tokenizer=tokenizer, completions=completions, extra_columns=extra_columns, **limits), batched=True, with_indices=True, remove_columns=source.column_names, features=features,
        num_proc=num_proc if num_proc > 1 else None,  # None: in this process (1 would start one worker)
        cache_file_name=str(cache_file) if writable else None, keep_in_memory=not writable, new_fingerprint=fingerprint, desc="Tokenizing",
    )  # fmt: skip
    return encoded, fingerprint, from_cache
