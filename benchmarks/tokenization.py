"""Seconds of `PreferenceDataModule.setup` on a first run (rows read, checked and tokenized) and on a
second run (the tokens read from the cache), for one data set, tokenizer and `--data.num_proc`.

    python benchmarks/tokenization.py --tokenizer $(lit-rlhf fetch-smollm2) --dataset human_like_dpo_7162.jsonl
    python benchmarks/tokenization.py --tokenizer $(lit-rlhf fetch-smollm2) --dataset human_like_dpo_7162.jsonl --rows 100000 --num_proc 2

`--rows N` first writes a synthetic N-row file to a temporary folder: the data set's rows repeated,
copy k with " (k)" appended to every field so that no two rows are alike. Each run starts from an
empty cache (a temporary `HF_DATASETS_CACHE`), in pairs mode with max length 512, and prints one
markdown table row for the README. (Not named tokenize.py: run as a script, that would shadow the
standard library's `tokenize` module.)
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import datasets.config

from lit_rlhf.data import PreferenceDataModule


def repeated_rows(dataset: Path, rows: int, out: Path) -> Path:
    """`out`: the first `rows` rows of `dataset` repeated, copy k (k >= 1) with " (k)" after every field."""
    source = [json.loads(line) for line in dataset.read_text(encoding="utf-8").splitlines() if line.strip()]
    with out.open("w", encoding="utf-8") as f:
        for i in range(rows):
            copy, row = divmod(i, len(source))
            row = source[row] if copy == 0 else {k: f"{v} ({copy})" for k, v in source[row].items()}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def setup_seconds(dataset: Path, tokenizer: str, num_proc: int) -> tuple[float, PreferenceDataModule]:
    """Wall time of one `setup("fit")` of a new DataModule, and the DataModule."""
    dm = PreferenceDataModule(dataset=str(dataset), tokenizer_name_or_path=tokenizer, max_length=512, num_proc=num_proc)
    start = time.perf_counter()
    dm.setup("fit")
    return time.perf_counter() - start, dm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="model folder or hub id whose tokenizer (and chat template) is used")
    parser.add_argument("--dataset", type=Path, required=True, help="a .jsonl file of preference rows")
    parser.add_argument("--rows", type=int, help="build a synthetic file of this many rows from --dataset")
    parser.add_argument("--num_proc", type=int, default=1, help="processes that tokenize (--data.num_proc)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = repeated_rows(args.dataset, args.rows, Path(tmp) / "rows.jsonl") if args.rows else args.dataset
        datasets.config.HF_DATASETS_CACHE = Path(tmp) / "cache"  # empty: the first run tokenizes
        first, dm = setup_seconds(dataset, args.tokenizer, args.num_proc)
        cached, again = setup_seconds(dataset, args.tokenizer, args.num_proc)
    assert again.train_rows == dm.train_rows and again.fingerprint == dm.fingerprint
    print(f"| {dm.num_rows:,} | {args.num_proc} | {first:.1f} s | {cached:.1f} s | {first / cached:.0f}× |")


if __name__ == "__main__":
    main()
