"""PreferenceDataModule: load preference rows, tokenize them (lit_rlhf/tokenization.py), split, collate.

One DataModule for every algorithm:
- `mode="pairs"` (reward model, DPO): batches of chosen and rejected sequences, right-padded,
  stacked as `[chosen; rejected]` so one forward scores both;
- `mode="unpaired"` (KTO): rows of one completion and a `label` (true: desirable), stacked as
  `[matched; mismatched]`, each prompt also with the next row's completion (KTO's KL estimate);
  `split_pairs` turns each preference pair into a desirable and an undesirable row;
- `mode="prompts"` (PPO): left-padded prompts ready for `generate`.

Attention masks come from sequence lengths, never from `input_ids != pad_id`: SmolLM's pad
token is its EOS (`<|im_end|>`), and a mask built from the pad id would drop the real
end-of-turn token of every completion.
"""

import json
from contextlib import contextmanager
from functools import partial
from typing import Literal, Optional

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from lit_rlhf.distributed import sharded
from lit_rlhf.errors import UserError, check_ranges
from lit_rlhf.loader import CountingDataLoader, ResumableBatchSampler
from lit_rlhf.models import load_tokenizer
from lit_rlhf.ops import IGNORE_INDEX
from lit_rlhf.rows import content_digest, load_rows
from lit_rlhf.tokenization import COMPLETIONS, cache_dir, encode_row, row_messages, tokenize_cached, unpaired_rows


@contextmanager
def local_rank_zero_first(trainer):
    """Run the block in the first process of each machine (local rank 0), then in the others, which then
    read what it cached (tokens, downloads) instead of computing it again. Without a trainer: just run it.
    The first process lets the others go on even when the block fails in it: they then fail with the
    same error (a bad row) instead of a broken connection."""
    first = trainer is None or trainer.local_rank == 0
    if not first:
        trainer.strategy.barrier("local_rank_zero_first")
    try:
        yield
    finally:
        if first and trainer is not None:
            trainer.strategy.barrier("local_rank_zero_first")


def linked_rows(*keys: list) -> list[int]:
    """Each row's group: the first row linked to it by an equal key in any of the `keys` columns (one value
    per row; None links nothing), directly or through other rows (union-find)."""
    parent = list(range(len(keys[0])))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = i = parent[parent[i]]
        return i

    for column in keys:
        first: dict = {}
        for i, key in enumerate(column):
            if key is not None:
                a, b = root(i), root(first.setdefault(key, i))
                parent[max(a, b)] = min(a, b)
    return [root(i) for i in range(len(parent))]


def split_by_prompt(prompts: list, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """Positions of the validation and of the training rows, each in a seeded random order; `prompts` holds
    each row's prompt (any hashable value, equal for rows that share a prompt).

    Rows are visited in that order, each taking every row of its prompt to validation unless that
    would pass `val_size`: rows that share a prompt stay on one side, so validation never scores a
    prompt that training saw. With enough distinct prompts exactly `val_size` rows are held out (with
    distinct prompts only, the first `val_size` rows of the order)."""
    groups: dict = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out: dict[int, None] = {}  # an ordered set
    for i in order:
        group = groups[prompts[i]]
        if len(held_out) == val_size:
            break
        if i not in held_out and len(held_out) + len(group) <= val_size:
            held_out.update(dict.fromkeys(group))
    return list(held_out), [i for i in order if i not in held_out]


def collate_sequences(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt + completion sequences.

    Returns `input_ids`, `attention_mask`, `labels`, each (N, T) with T the longest row; `labels`
    holds the completion tokens and IGNORE_INDEX on prompt and padding.
    """
    T = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        n = len(prompt) + len(completion)
        input_ids[i, :n] = torch.tensor(prompt + completion)
        attention_mask[i, :n] = 1
        labels[i, len(prompt) : n] = torch.tensor(completion)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def padded_length(row: dict) -> int:
    """The length a row pads its batch to: prompt plus the longer completion (pairs), plus its completion
    (unpaired), or the prompt."""
    return len(row["prompt"]) + max((len(row[c]) for c in ("chosen", "rejected", "completion") if c in row), default=0)


def collate_pairs(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `[chosen; rejected]` batch (`collate_sequences` of 2B rows).

    Rows 0..B-1 are the chosen sequences, rows B..2B-1 the rejected ones. Rows encoded by the
    DataModule also pass their `index` (B,) through: their position in the dataset, which lets a
    module keep per-row state (DPO's precomputed reference log-probs).
    """
    rows = [(e["prompt"], e["chosen"]) for e in examples] + [(e["prompt"], e["rejected"]) for e in examples]
    batch = collate_sequences(rows, pad_id)
    if "index" in examples[0]:
        batch["index"] = torch.tensor([e["index"] for e in examples])
    return batch


def collate_unpaired(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `[matched; mismatched]` batch of unpaired rows (`collate_sequences` of 2B rows), and `label` (B,) bool.

    Rows 0..B-1 are each prompt with its own completion; rows B..2B-1 each prompt i with the completion of
    row (i + 1) mod B, whose log-ratios estimate KTO's reference point (the KL of policy to reference).
    Also `index` (B,), when the rows have one.
    """
    B = len(examples)
    rows = [(e["prompt"], e["completion"]) for e in examples]
    rows += [(e["prompt"], examples[(i + 1) % B]["completion"]) for i, e in enumerate(examples)]
    batch = collate_sequences(rows, pad_id)
    batch["label"] = torch.tensor([e["label"] for e in examples])
    if "index" in examples[0]:
        batch["index"] = torch.tensor([e["index"] for e in examples])
    return batch


#: the fields an encoded prompt row adds to its source row's columns (`PreferenceDataModule`); the rest are the row's own
ENCODED_FIELDS = ("prompt", "truncated", "prompt_text", "index")


def collate_prompts(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts: `input_ids`, `attention_mask`, each (B, P) with P the longest prompt.

    Rows encoded by the DataModule also pass their `prompt_text` (B strings) through, for sample
    tables and reward functions, their `index` (B,), and `columns`: each other column of the rows
    (e.g. `answer`) as a list of B values, for reward functions.
    """
    P = max(len(e["prompt"]) for e in examples)
    input_ids = torch.full((len(examples), P), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), P), dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, P - len(e["prompt"]) :] = torch.tensor(e["prompt"])
        attention_mask[i, P - len(e["prompt"]) :] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "prompt_text" in examples[0]:
        batch["prompt_text"] = [e["prompt_text"] for e in examples]
    if "index" in examples[0]:
        batch["index"] = torch.tensor([e["index"] for e in examples])
    batch["columns"] = {k: [e[k] for e in examples] for k in examples[0] if k not in ENCODED_FIELDS}
    return batch


class PreferenceDataModule(L.LightningDataModule):
    flag_ranges = {"max_length": "> 0", "max_prompt_length": "> 0", "batch_size": "> 0", "val_size": ">= 0", "limit": "> 0",
                   "offset": ">= 0", "num_workers": ">= 0", "num_proc": "> 0"}  # fmt: skip

    def __init__(
        self,
        dataset: str = "HumanLLMs/Human-Like-DPO-Dataset",
        tokenizer_name_or_path: Optional[str] = None,
        mode: Literal["pairs", "unpaired", "prompts"] = "pairs",
        max_length: int = 512,
        max_prompt_length: int = 128,
        truncation: Literal["truncate", "drop"] = "truncate",
        batch_size: int = 8,
        val_size: int = 200,
        limit: Optional[int] = None,
        offset: int = 0,
        seed: int = 42,
        shuffle_seed: Optional[int] = None,
        num_workers: int = 0,
        num_proc: int = 1,
        group_by_length: bool = True,
        dedupe: bool = False,
        split_pairs: bool = False,
    ):
        """Preference data for every algorithm.

        Args:
            dataset: Hub id or local .json/.jsonl/.parquet/.csv file or folder. Rows hold `prompt`,
                `chosen`, `rejected`, each a string or a list of chat messages (`prompt` only in
                prompts mode).
            tokenizer_name_or_path: Tokenizer source; the CLI sets it from `--model.model_name_or_path`.
            mode: `pairs` (chosen/rejected, for reward model and DPO), `unpaired` (rows of `prompt`,
                `completion` and a boolean `label`, true for a desirable completion: KTO) or `prompts`
                (left-padded prompts, for PPO).
            max_length: Longest prompt + completion in tokens.
            max_prompt_length: Longest prompt in tokens.
            truncation: `truncate`: prompts keep their last `max_prompt_length` tokens and completions
                their first tokens up to `max_length`; `drop`: rows over a limit are dropped. Both
                counts are logged.
            batch_size: Rows (pairs or prompts) per batch.
            val_size: Rows held out for validation (a seeded random split that keeps the rows of one
                prompt on one side).
            limit: Use only the first N rows of the dataset (after `offset`, before the split).
            offset: Skip the first N rows of the dataset: e.g. a judge reward model trained on rows
                that no other stage reads.
            seed: Seed of the train/validation split and, unless `shuffle_seed` is set, of the training
                order (epoch `e` is shuffled under `seed + e`, the same on every process).
            shuffle_seed: Seed of the training order alone: runs that differ only in it train on the
                same rows, in another order, and validate on the same held-out rows (seed replicates).
            num_workers: DataLoader worker processes.
            num_proc: Processes that tokenize the rows (`datasets`' map). Tokenized rows are cached on disk
                (in `HF_DATASETS_CACHE`, under `lit_rlhf/tokenized`), keyed by the rows, tokenizer and
                length settings: a later run with the same ones, and every process of a multi-process run
                but the first, read the cache instead.
            group_by_length: Training batches of rows of similar length, still shuffled (see
                `loader.ResumableBatchSampler`): less of each batch is padding (docs/speed.md measures
                it). `false`: batches of random rows.
            dedupe: Drop exact copies of an earlier row (after tokenization) and pairs whose chosen and
                rejected answers are the same. Without it both are kept and counted in a warning.
            split_pairs: In `unpaired` mode, read preference pairs and turn each into two rows: the
                chosen completion as desirable, the rejected one as undesirable.
        """
        super().__init__()
        self.save_hyperparameters()
        self.check_flags(self.hparams)
        self.train_rows: list[dict] = []
        self.val_rows: list[dict] = []
        self.num_rows = 0  # rows kept before the split: every row's `index` is below it
        self.fingerprint = ""  # of the tokenized rows: what they depend on (`tokenize_cached`)
        self.dataset_digest: Optional[str] = None  # of a local dataset's files: a resume may read them from another path
        self.train_sampler: Optional[ResumableBatchSampler] = None

    @classmethod
    def check_flags(cls, hp: dict) -> None:
        """Raise a UserError for the first flag out of its range (the CLI calls this before any model loads)."""
        check_ranges("data", hp, cls.flag_ranges)
        if hp["max_prompt_length"] >= hp["max_length"]:
            raise UserError(f"--data.max_prompt_length ({hp['max_prompt_length']}) must be below --data.max_length ({hp['max_length']})")

    def encode(self, tokenizer, row: dict, where: str) -> Optional[dict]:
        """Token ids of one row under this DataModule's mode and length limits; None if dropped."""
        hp = self.hparams
        completions = COMPLETIONS[hp.mode]
        return encode_row(tokenizer, row, where, completions, hp.max_length, hp.max_prompt_length, hp.truncation)

    def setup(self, stage: str) -> None:
        if self.train_rows:
            return
        hp = self.hparams
        if hp.tokenizer_name_or_path is None:
            raise UserError("PreferenceDataModule needs tokenizer_name_or_path (the CLI sets it from --model.model_name_or_path)")
        self.tokenizer = load_tokenizer(hp.tokenizer_name_or_path)
        completions = COMPLETIONS[hp.mode]
        with local_rank_zero_first(self.trainer):  # the other processes read what it downloaded and tokenized
            rows = load_rows(hp.dataset)[hp.offset :][: hp.limit]
            self.dataset_digest = content_digest(hp.dataset)
            if hp.mode == "unpaired":
                rows = unpaired_rows(rows, hp.split_pairs)
            encoded, self.fingerprint, from_cache = tokenize_cached(
                rows, self.tokenizer, completions, hp.num_proc, max_length=hp.max_length, max_prompt_length=hp.max_prompt_length,
                truncation=hp.truncation,
            )  # fmt: skip
        encoded = encoded.to_list()
        rank_zero_info(
            f"{hp.dataset}: {len(rows)} rows, {sum(e['truncated'] for e in encoded)} truncated,"
            f" {len(rows) - len(encoded)} dropped (truncation={hp.truncation}, max_length={hp.max_length},"
            f" max_prompt_length={hp.max_prompt_length}); tokens {'read from' if from_cache else 'written to'} the cache"
            f" {cache_dir('tokenized')} ({self.fingerprint})"
        )
        # The split is drawn over every row, then the rows that tokenization or --data.dedupe dropped leave it: a run
        # that drops other rows (another max length) holds out the same prompts, so stages never train on each other's.
        # Rows share a prompt if their prompts are equal as written or, cut at max_prompt_length, as tokens.
        tokens: list = [None] * len(rows)
        for e in encoded:
            tokens[e["source"]] = tuple(e["prompt"])
        written = [json.dumps(row_messages(row, where, ())["prompt"]) for where, row in rows]
        val, train = split_by_prompt(linked_rows(written, tokens), hp.val_size, hp.seed)
        kept = {e.pop("source"): dict(e, index=i) for i, e in enumerate(self.degenerate_rows_checked(encoded))}
        self.val_rows, self.train_rows = [kept[i] for i in val if i in kept], [kept[i] for i in train if i in kept]
        if not self.train_rows:
            raise UserError(f"{hp.dataset}: {len(kept)} usable rows leave none for training with --data.val_size {hp.val_size}")
        if len(self.val_rows) < len(val):
            rank_zero_warn(f"{hp.dataset}: {len(val) - len(self.val_rows)} of the {len(val)} held-out rows were dropped, which leaves"
                           f" {len(self.val_rows)} for validation (the held-out prompts stay those of a run that drops none)")  # fmt: skip
        self.num_rows = len(kept)
        lengths = [padded_length(row) for row in self.train_rows] if hp.group_by_length else None
        self.train_sampler = ResumableBatchSampler(len(self.train_rows), hp.batch_size, shuffle=True, lengths=lengths,
                                                  seed=hp.seed if hp.shuffle_seed is None else hp.shuffle_seed)

    def degenerate_rows_checked(self, rows: list[dict]) -> list[dict]:
        """`rows` with exact copies of an earlier row and pairs whose chosen == rejected counted in a warning,
        or dropped with `dedupe`. A copy trains its row twice and can land in validation; chosen ==
        rejected trains at log 2 and teaches nothing."""
        hp, seen = self.hparams, set()
        copies, ties = [False] * len(rows), [False] * len(rows)
        for i, row in enumerate(rows):
            key = (*(tuple(row[k]) for k in ("prompt", "chosen", "rejected", "completion") if k in row), row.get("label"))
            copies[i], ties[i] = key in seen, "chosen" in row and row["chosen"] == row["rejected"]
            seen.add(key)
        if any(copies) or any(ties):
            what = f"{sum(copies)} rows are exact copies of an earlier row, {sum(ties)} have chosen == rejected"
            if not hp.dedupe:
                rank_zero_warn(f"{hp.dataset}: {what}; they are kept (--data.dedupe true drops them)")
                return rows
            rank_zero_info(f"{hp.dataset}: {what}; dropped (--data.dedupe)")
        return [row for row, copy, tie in zip(rows, copies, ties) if not (copy or tie)]

    def rank_and_world_size(self, rows: list[dict], stage: str) -> tuple[int, int]:
        """`(rank, world_size)` of this process in the attached trainer, `(0, 1)` without one; every
        process needs at least one of `rows` (a process without batches would stall the others)."""
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        if 0 < len(rows) < world_size:
            raise UserError(f"{len(rows)} {stage} rows for {world_size} processes: every process needs at least one row")
        return rank, world_size

    def _loader(self, rows: list[dict], batch_sampler, loader_class=DataLoader) -> DataLoader:
        collate = {"pairs": collate_pairs, "unpaired": collate_unpaired, "prompts": collate_prompts}[self.hparams.mode]
        return loader_class(
            rows,
            batch_sampler=batch_sampler,
            collate_fn=partial(collate, pad_id=self.tokenizer.pad_token_id),
            num_workers=self.hparams.num_workers,
        )

    def train_dataloader(self) -> CountingDataLoader:
        """Shuffled each epoch, this process's share (`ResumableBatchSampler`); a checkpoint resumes it at
        the next unseen batch (`state_dict`)."""
        self.train_sampler.rank, self.train_sampler.world_size = self.rank_and_world_size(self.train_rows, "training")
        return self._loader(self.train_rows, self.train_sampler, CountingDataLoader)

    def state_dict(self) -> dict:
        """The training order and position, and the local dataset's digest, saved in every checkpoint."""
        return {**(self.train_sampler.state_dict() if self.train_sampler else {}), "dataset_digest": self.dataset_digest}

    def load_state_dict(self, state: dict) -> None:
        sampler_state = {k: v for k, v in state.items() if k != "dataset_digest"}
        if sampler_state:
            self.train_sampler.load_state_dict(sampler_state)

    def val_dataloader(self) -> DataLoader:
        """In order; this process's share: every held-out row is served to one process, once."""
        rank, world_size = self.rank_and_world_size(self.val_rows, "validation")
        shares = [ResumableBatchSampler(len(self.val_rows), self.hparams.batch_size, shuffle=False, rank=r, world_size=world_size)
                  for r in range(world_size)]  # fmt: skip
        counts = [len(share) for share in shares]
        if sharded(self.trainer) and len(set(counts)) > 1:  # a process with a batch more would wait forever in its forward
            raise UserError(
                f"--data.val_size {len(self.val_rows)} gives the {world_size} processes {counts} validation batches; with sharded"
                " parameters every forward is a collective, so each needs the same number: pick a multiple of"
                f" {world_size * self.hparams.batch_size} (processes x --data.batch_size)"
            )
        return self._loader(self.val_rows, shares[rank])

    def every_row_dataloader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        """Training then validation rows, unshuffled, for work done once per row (DPO's reference log-probs),
        split over processes: process `rank` of `world_size` (W) takes rows rank, rank + W, ..., its last
        row repeated so that every process runs the same number of batches (under FSDP a forward pass is
        a collective: a process with a batch more would wait forever)."""
        rows = self.train_rows + self.val_rows
        share = list(range(rank, len(rows), world_size))
        share += share[-1:] * (-(-len(rows) // world_size) - len(share))
        batch_size = self.hparams.batch_size
        return self._loader(rows, [share[i : i + batch_size] for i in range(0, len(share), batch_size)])
