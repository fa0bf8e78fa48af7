"""JSONL files written atomically (temp file in the same folder, then rename), and their sha256."""

import hashlib
import json
from typing import Any, Dict, Iterable, Iterator, Tuple

from runner.atomic import atomic_writer


def write_jsonl_atomic(path, rows: Iterable[Dict[str, Any]]) -> Tuple[int, str]:
    """Write rows to `path`; a crash part-way (an exception from `rows`, a kill) leaves no half file behind.
    Returns (rows written, sha256 of the file)."""
    digest = hashlib.sha256()
    count = 0
    with atomic_writer(path, "wb", fsync=True) as f:
        for row in rows:
            line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
            f.write(line)
            digest.update(line)
            count += 1
    return count, digest.hexdigest()


def iter_jsonl(path) -> Iterator[Tuple[int, str]]:
    """(line number, raw line) for every non-empty line; line numbers are 1-based as editors show them."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, line


def read_jsonl(path) -> list:
    return [json.loads(line) for _, line in iter_jsonl(path)]
