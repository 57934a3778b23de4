"""Files and folders that a later step trusts are written beside their target and renamed into place."""

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def written_atomically(target: Path) -> Iterator[Path]:
    """A fresh path beside `target`, unique to this writer, for the block to write a file or a folder to;
    renamed onto `target` when the block ends, removed when it fails. Readers (and concurrent writers)
    see the old target or the whole new one, never a part. A rename cannot replace a folder that holds
    files: then the new copy is removed and the `OSError` raised."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        yield partial
        os.replace(partial, target)
    finally:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
