"""Preference rows from a hub id or local files, checked: every error names the file, the row and the field."""

import hashlib
import json
from pathlib import Path
from typing import Optional

from lit_rlhf.errors import UserError
from lit_rlhf.models import hub_reachable

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
ROLES = ("system", "user", "assistant", "tool")  # `tool`: a tool's result in a worked example (lit_rlhf/tools.py)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not UTF-8 text (byte {err.start}: {err.reason}); re-save the file as UTF-8") from None


def _read_file(path: Path) -> list[dict]:
    """Rows of one local file; JSON is parsed here so that errors can name the line."""
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(_read_text(path).splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}: line {n}: invalid JSON ({err.msg})") from None
        return rows
    if path.suffix == ".json":
        try:
            rows = json.loads(_read_text(path))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: invalid JSON at line {err.lineno} ({err.msg})") from None
        if not isinstance(rows, list):
            raise UserError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
        return rows
    import datasets

    try:
        return datasets.load_dataset(FILE_FORMATS[path.suffix], data_files=str(path), split="train").to_list()
    except Exception as err:  # datasets wraps the parser's error; show the parser's message
        cause = err.__cause__ or err
        raise UserError(f"{path}: cannot read it ({type(cause).__name__}: {cause})") from None


def local_files(dataset: str) -> list[Path]:
    """The data files of a local file or folder `dataset`, in the order they are read; [] for a hub id."""
    path = Path(dataset).expanduser()
    if path.is_file() or path.is_dir():
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in FILE_FORMATS)
        if not files or any(p.suffix not in FILE_FORMATS for p in files):
            raise UserError(f"{dataset}: expected a .json, .jsonl, .parquet or .csv file, or a folder of them")
        return files
    return []


def content_digest(dataset: str) -> Optional[str]:
    """SHA-256 of a local dataset's files, in reading order: the same digest for the same rows at another
    path (a copy to scratch, another mount). None for a hub id."""
    files = local_files(dataset)
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):  # 1 MiB at a time: a large file is not held whole
                digest.update(block)
    return digest.hexdigest()


def load_rows(dataset: str, split: str = "train") -> list[tuple[str, dict]]:
    """`(where, row)` pairs from a hub id or a local file or folder; `where` names file and row."""
    files, path = local_files(dataset), Path(dataset).expanduser()
    if files:
        return [(f"{p}: row {n}", row) for p in files for n, row in enumerate(_read_file(p), start=1)]
    if dataset.startswith((".", "/", "~")) or path.suffix in FILE_FORMATS:
        raise UserError(
            f"{dataset}: no such file or folder; pass a local .json/.jsonl/.parquet/.csv file or folder, or a"
            " hub id such as HumanLLMs/Human-Like-DPO-Dataset"
        )
    import datasets
    import datasets.config

    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = offline or not hub_reachable()  # offline: the local cache or a fast error
    try:
        rows = datasets.load_dataset(dataset, split=split).to_list()
    except Exception as err:
        raise UserError(
            f"could not load dataset '{dataset}' from the Hugging Face hub ({type(err).__name__}:"
            f" {str(err).splitlines()[0] if str(err) else ''}). Offline, pass a local file instead, e.g."
            " --data.dataset lit_rlhf/assets/human_like_dpo_1k.jsonl"
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = offline
    return [(f"{dataset}: row {n}", row) for n, row in enumerate(rows, start=1)]


def as_messages(row, field: str, where: str, role: str) -> list[dict]:
    """`row[field]` as chat messages: a string becomes one `role` message; a message list is checked and
    each message reduced to its `role` and `content`."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected an object with keys prompt/chosen/rejected, got {type(row).__name__}")
    value = row.get(field)
    if isinstance(value, str):
        if not value.strip():
            raise UserError(f"{where}: field '{field}' is empty")
        return [{"role": role, "content": value}]
    if value is None:
        raise UserError(f"{where}: field '{field}' is missing")
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: field '{field}' must be a non-empty string or list of chat messages")
    for i, message in enumerate(value):
        if not (
            isinstance(message, dict)
            and message.get("role") in ROLES
            and isinstance(message.get("content"), str)
            and message["content"].strip()
        ):
            raise UserError(
                f"{where}: field '{field}' message {i} must be {{'role': one of {ROLES}, 'content': non-empty"
                f" string}}, got {str(message)[:80]}"
            )
    if value[-1]["role"] != role:
        raise UserError(f"{where}: field '{field}' must end with a '{role}' message, ends with '{value[-1]['role']}'")
    return [{"role": message["role"], "content": message["content"]} for message in value]
