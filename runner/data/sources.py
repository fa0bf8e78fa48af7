"""A user's data file read as numbered rows, for validation to name what it finds by line or row.

    .jsonl    (line number, the line's bytes): numbered as editors count lines; blank lines skipped; a line that is
              not JSON or not UTF-8 is one invalid row, found by validation
    .json     a JSON array: (row number, the parsed row), 1-based; a .json file that is not an array is read as
              JSON Lines (as `datasets`' json builder does)
    .parquet  (row number, the row as a dict), read with pyarrow
"""

from pathlib import Path
from typing import Any, Iterator, Tuple

from runner.data.download import DatasetRequestError
from runner.data.validate import DataValidationError

SUFFIXES = (".jsonl", ".json", ".parquet")


def _lines(path: Path) -> Iterator[Tuple[int, bytes]]:
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield number, line


def read_rows(path) -> Tuple[str, Iterator[Tuple[int, Any]]]:
    """("line" or "row", the numbered rows of `path`)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise DatasetRequestError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "line", _lines(path)
    if suffix == ".json":
        data = path.read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataValidationError(f"{path}: not UTF-8 text (byte {exc.start + 1}); save the file as UTF-8") from None
        if not text.lstrip().startswith("["):
            return "line", _lines(path)
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataValidationError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); a .json "
                                      f"file holds one array of rows") from None
        return "row", iter(enumerate(rows, 1))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow's own errors: ArrowInvalid and friends
            raise DataValidationError(f"{path}: not a readable Parquet file ({exc})") from None
        return "row", iter(enumerate(table.to_pylist(), 1))
    raise DatasetRequestError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; use one of "
                              f"{', '.join(SUFFIXES)}")
