"""Get the first N percent of every split of a chat dataset as `<download_dir>/<split>.jsonl`, as the notebook's
download script does (`load_dataset(name, split=f"{split}[0%:{pc}%]")`).

The source is a hub id (HuggingFaceH4/ultrachat_200k) or local files: a folder holding `<split>.jsonl` / `.json` /
`.parquet`, or one file. A local JSONL split's first N percent is copied line for line in one streaming pass (no
Arrow conversion, no re-serialisation, and line numbers stay those of the source, so a validation error points at
the line to fix there); JSON, Parquet and hub splits go through `datasets` (row N is line N of the written file).
The row count for a percent is the one `datasets` computes for `split[0%:N%]`, whichever path is taken. Rows keep
their format here: validation (runner/data/validate.py) converts ShareGPT/Alpaca rows to messages rows.

Each split is written atomically, and a manifest (`manifest.json`: the request, rows and sha256 of every file) is
written last: a later call with the same request whose files still hash as recorded skips the work (the cache);
`force=True` redoes it.
"""

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from runner.atomic import atomic_writer, sha256_file, write_json
from runner.errors import RunnerError

MANIFEST = "manifest.json"
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DatasetRequestError(RunnerError):
    pass


def rows_for_percent(total: int, split_percent: float) -> int:
    """Rows in the first `split_percent` percent of `total`: what `datasets` takes for `split[0%:N%]` (nearest,
    Python's round), so the local fast path and the `datasets` path agree row for row."""
    return int(round(split_percent * total / 100.0))


def check_split_percent(split_percent: float) -> float:
    value = float(split_percent)
    if not (0 < value <= 100):
        raise DatasetRequestError(f"split percent {split_percent} must be in (0, 100] (dataset.split_percent)")
    return value


def write_manifest(download_dir, request: Dict[str, Any], splits: Dict[str, Dict[str, Any]],
                   **extra: Any) -> Dict[str, Any]:
    manifest = {"request": request, "splits": splits, **extra, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(Path(download_dir) / MANIFEST, manifest)
    return manifest


def cached_manifest(download_dir, request: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The manifest if it answers exactly this request and every file is still there, else None."""
    path = Path(download_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    if manifest.get("request") != request:
        return None
    for entry in manifest.get("splits", {}).values():  # a deleted or edited file is not a cache hit
        path = Path(entry["file"])
        if not path.exists() or sha256_file(path) != entry.get("sha256"):
            return None
    return manifest


def update_manifest(download_dir, changes: Dict[str, Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """Merge per-split facts (e.g. rows/sha256 after validation dropped rows) into the manifest, so it keeps
    describing the files on disk and stays a cache hit."""
    path = Path(download_dir) / MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    for split, facts in changes.items():
        manifest["splits"].setdefault(split, {}).update(facts)
    write_json(path, manifest)
    return manifest


def copy_jsonl_percent(src, dst, split_percent: float) -> Tuple[int, str]:
    """The first `split_percent` percent of the non-empty lines of a JSONL file, copied byte for byte (blank lines
    between them too, so line numbers match the source). Returns (rows, sha256 of the written file)."""
    with open(src, "rb") as f:
        total = sum(1 for line in f if line.strip())
    keep = rows_for_percent(total, split_percent)
    digest = hashlib.sha256()
    rows = 0
    with open(src, "rb") as f, atomic_writer(dst, "wb", fsync=True) as out:
        for line in f:
            if rows >= keep:
                break
            if line.strip():
                rows += 1
            if not line.endswith(b"\n"):
                line += b"\n"
            out.write(line)
            digest.update(line)
    return rows, digest.hexdigest()


def _local_source(path: Path, split: str) -> Tuple[str, str]:
    """(datasets builder, data file) for one split of a local dataset."""
    if path.is_file():
        builder = LOCAL_FORMATS.get(path.suffix)
        if not builder:
            raise DatasetRequestError(f"{path}: unsupported file type (use {', '.join(LOCAL_FORMATS)})")
        return builder, str(path)
    for suffix, builder in LOCAL_FORMATS.items():
        candidate = path / f"{split}{suffix}"
        if candidate.exists():
            return builder, str(candidate)
    available = sorted(p.name for p in path.iterdir() if p.suffix in LOCAL_FORMATS)
    raise DatasetRequestError(f"split {split!r} not found in {path}: expected {split}.jsonl, .json or .parquet "
                              f"(found: {', '.join(available) or 'nothing'})")


def chat_columns(dataset: str, split: str, names, columns: Optional[Dict[str, str]] = None) -> List[str]:
    """The columns of a `datasets` split that chat rows are made of (any format's fields, or the source's own
    names for them in `columns`), in the source's order; an error naming the columns there are when none is."""
    from runner.data.formats import FIELDS, KEY_FIELDS

    wanted = set(FIELDS) | set((columns or {}).values())
    keep = [c for c in names if c in wanted]
    keys = set(KEY_FIELDS.values()) | {(columns or {}).get(k) for k in KEY_FIELDS.values()}
    if not keys & set(keep):
        raise DatasetRequestError(f"{dataset} split {split!r} has no chat column: none of 'messages', 'conversations' "
                                  f"(ShareGPT) or 'instruction' (Alpaca) among {sorted(names)}; map yours with "
                                  f"dataset.columns, e.g. dataset.columns.messages={sorted(names)[0]}")
    return keep


def load_split(dataset: str, split: str, split_percent: float, subset: Optional[str] = None):
    """One split's first `split_percent` percent as a `datasets.Dataset` (hub id or local files)."""
    from datasets import load_dataset

    # datasets' slice syntax takes whole percents only: a fractional percent loads the split and selects the same
    # rows that the slice would (rows_for_percent)
    whole = float(split_percent).is_integer()
    sliced = f"{split}[0%:{int(split_percent)}%]" if whole and split_percent < 100 else split

    def first_rows(data):
        return data if whole else data.select(range(rows_for_percent(len(data), split_percent)))

    local = Path(dataset)
    if local.exists():
        builder, data_file = _local_source(local, split)
        return first_rows(load_dataset(builder, data_files={split: data_file}, split=sliced))
    try:
        return first_rows(load_dataset(dataset, subset, split=sliced))
    except ValueError as exc:  # datasets says "Unknown split" with the available ones
        if "split" in str(exc).lower():
            raise DatasetRequestError(f"{dataset}: {exc}") from exc
        raise
    except ConnectionError as exc:  # no route to the hub: say what works offline
        raise DatasetRequestError(f"{dataset}: the dataset hub cannot be reached ({exc}); use dataset=sample, or "
                                  f"point dataset.name at a local folder of <split>.jsonl/.json/.parquet") from exc


def download_splits(
    dataset: str,
    splits: List[str],
    split_percent: float,
    download_dir,
    *,
    subset: Optional[str] = None,
    force: bool = False,
    columns: Optional[Dict[str, str]] = None,
) -> Dict[str, Any]:
    """Write every split's JSONL and the manifest; returns the manifest (with `"cached": True` on a cache hit).
    Rows keep the source's column names (`columns` names the ones to keep besides ours); validation converts
    them to messages rows (runner/data/validate.py)."""
    from runner.data.jsonl import write_jsonl_atomic

    split_percent = check_split_percent(split_percent)
    if not splits:
        raise DatasetRequestError("no splits requested (dataset.splits)")
    download_dir = Path(download_dir)
    request = {"source": "hub" if not Path(dataset).exists() else "local", "dataset": dataset, "subset": subset,
               "splits": list(splits), "split_percent": split_percent}
    if columns:  # a different mapping is a different request (older manifests, without the key, stay valid)
        request["columns"] = dict(columns)
    if not force:
        manifest = cached_manifest(download_dir, request)
        if manifest:
            return {**manifest, "cached": True}
    local = Path(dataset)
    sources = {split: _local_source(local, split) for split in splits} if local.exists() else {}  # all named first
    written = {}
    for split in splits:
        path = download_dir / f"{split}.jsonl"
        source = sources.get(split)
        if source and source[1].endswith(".jsonl"):
            rows, digest = copy_jsonl_percent(source[1], path, split_percent)
        else:
            data = load_split(dataset, split, split_percent, subset)
            data = data.select_columns(chat_columns(dataset, split, data.column_names, columns))
            rows, digest = write_jsonl_atomic(path, iter(data))
        if rows == 0:  # an empty training or test split fails much later and less clearly
            raise DatasetRequestError(f"{dataset} split {split!r}: the first {split_percent:g}% is no rows; "
                                      f"raise dataset.split_percent")
        written[split] = {"file": str(path), "rows": rows, "sha256": digest}
        print(f"    {split}: {rows} rows ({split_percent:g}%) -> {path}", flush=True)
    return {**write_manifest(download_dir, request, written), "cached": False}
