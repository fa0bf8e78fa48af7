"""Get the first N percent of every split of a chat dataset as `<download_dir>/<split>.jsonl`, as the notebook's
download script does (`load_dataset(name, split=f"{split}[0%:{pc}%]")`).

The source is a hub id (HuggingFaceH4/ultrachat_200k) or local files that `datasets` reads: a folder holding
`<split>.jsonl` / `.json` / `.parquet`, or one file. Each split is written atomically, and a manifest
(`manifest.json`: the request, rows per split, sha256 of every file) is written last: a later call with the same
request finds the manifest and skips the work (the cache), `force=True` redoes it.
"""

import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from runner.errors import RunnerError
from runner.atomic import write_json

MANIFEST = "manifest.json"
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DatasetRequestError(RunnerError):
    pass


def check_split_percent(split_percent: float) -> float:
    value = float(split_percent)
    if not (0 < value <= 100):
        raise DatasetRequestError(f"split percent {split_percent} must be in (0, 100] (dataset.split_percent)")
    return value


def write_manifest(download_dir, request: Dict[str, Any], splits: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    manifest = {"request": request, "splits": splits, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
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
    if not all(Path(s["file"]).exists() for s in manifest.get("splits", {}).values()):
        return None
    return manifest


def _local_source(path: Path, split: str) -> tuple[str, str]:
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


def load_split(dataset: str, split: str, split_percent: float, subset: Optional[str] = None):
    """One split's first `split_percent` percent as a `datasets.Dataset` (hub id or local files)."""
    from datasets import load_dataset

    sliced = f"{split}[0%:{split_percent:g}%]" if split_percent < 100 else split
    local = Path(dataset)
    if local.exists():
        builder, data_file = _local_source(local, split)
        return load_dataset(builder, data_files={split: data_file}, split=sliced)
    try:
        return load_dataset(dataset, subset, split=sliced)
    except ValueError as exc:  # datasets says "Unknown split" with the available ones
        if "split" in str(exc).lower():
            raise DatasetRequestError(f"{dataset}: {exc}") from exc
        raise


def download_splits(
    dataset: str,
    splits: List[str],
    split_percent: float,
    download_dir,
    *,
    subset: Optional[str] = None,
    force: bool = False,
) -> Dict[str, Any]:
    """Write every split's JSONL and the manifest; returns the manifest (with `"cached": True` on a cache hit)."""
    from runner.data.jsonl import write_jsonl_atomic

    split_percent = check_split_percent(split_percent)
    if not splits:
        raise DatasetRequestError("no splits requested (dataset.splits)")
    download_dir = Path(download_dir)
    request = {"source": "hub" if not Path(dataset).exists() else "local", "dataset": dataset, "subset": subset,
               "splits": list(splits), "split_percent": split_percent}
    if not force:
        manifest = cached_manifest(download_dir, request)
        if manifest:
            return {**manifest, "cached": True}
    written = {}
    for split in splits:
        data = load_split(dataset, split, split_percent, subset)
        columns = set(data.column_names)
        if "messages" not in columns:
            raise DatasetRequestError(f"{dataset} split {split!r} has no 'messages' column (columns: {sorted(columns)})")
        path = download_dir / f"{split}.jsonl"
        rows, digest = write_jsonl_atomic(path, ({k: row[k] for k in ("prompt", "prompt_id", "messages") if k in row}
                                                 for row in data))
        written[split] = {"file": str(path), "rows": rows, "sha256": digest}
        print(f"    {split}: {rows} rows ({split_percent:g}%) -> {path}", flush=True)
    return {**write_manifest(download_dir, request, written), "cached": False}
