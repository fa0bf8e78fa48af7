"""JSONL files written atomically (temp file in the same folder, then rename), and their sha256."""

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Tuple


def write_jsonl_atomic(path, rows: Iterable[Dict[str, Any]]) -> Tuple[int, str]:
    """Write rows to `path`; a crash part-way (an exception from `rows`, a kill) leaves no half file behind.
    Returns (rows written, sha256 of the file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    digest = hashlib.sha256()
    count = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for row in rows:
                line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
                f.write(line)
                digest.update(line)
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return count, digest.hexdigest()


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def iter_jsonl(path) -> Iterator[Tuple[int, str]]:
    """(line number, raw line) for every non-empty line; line numbers are 1-based as editors show them."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, line


def read_jsonl(path) -> list:
    return [json.loads(line) for _, line in iter_jsonl(path)]
