"""dataset=local: a user's own chat file(s) in the four-split layout the steps read.

`dataset.train_file` (JSONL, JSON array or Parquet; messages, ShareGPT or Alpaca rows) is read, converted to messages
rows and validated with its own line (or row) numbers. The eval rows are `dataset.eval_file` when given, else
`dataset.eval_percent` percent of the train rows held out: the rows whose seeded hash of their id ranks lowest, so
the same file and seed give the same split on every run and machine (and a row keeps its side when others are
added, as far as the count allows). Then

    train_sft, train_gen  <- the train rows          test_sft, test_gen <- the eval rows

are written (atomically) under `dataset.download_dir` with the manifest; the request, including every input
file's sha256, is the cache key, so an edited file is read again.
"""

import hashlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from runner.atomic import sha256_file
from runner.data.download import DatasetRequestError, cached_manifest, write_manifest
from runner.data.formats import column_map, row_id


def _file(value: Optional[str], key: str, required: bool) -> Optional[Path]:
    if not value:
        if required:
            raise DatasetRequestError(f"dataset=local needs {key}=PATH: a .jsonl, .json or .parquet file of chat rows "
                                      f"(messages, ShareGPT or Alpaca), e.g. {key}=data/chats.jsonl")
        return None
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise DatasetRequestError(f"{key}={value}: no such file" + (" (a folder? name one file)" if path.is_dir() else ""))
    return path


def hold_out(rows: List[Dict[str, Any]], eval_percent: float, seed: int) -> Tuple[List[dict], List[dict]]:
    """(train rows, eval rows), both in file order: the eval rows are the round(eval_percent% of n) rows (at
    least one, never all) whose sha256(seed, row id) ranks lowest."""
    if not (0 < eval_percent < 100):
        raise DatasetRequestError(f"dataset.eval_percent={eval_percent} must be in (0, 100)")
    if len(rows) < 2:
        raise DatasetRequestError(f"{len(rows)} valid row(s): holding out eval rows needs at least 2; add rows or "
                                  f"give dataset.eval_file")
    n_eval = min(len(rows) - 1, max(1, int(round(eval_percent * len(rows) / 100.0))))
    rank = sorted(range(len(rows)), key=lambda i: hashlib.sha256(f"{seed}:{row_id(rows[i])}".encode()).digest())
    held = set(rank[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def _read(path: Path, role: str, dataset_cfg, download_dir: Path) -> Tuple[List[dict], Dict[str, Any]]:
    from runner.data.sources import read_rows
    from runner.data.validate import validate_rows

    unit, items = read_rows(path)
    rows, report = validate_rows(str(path), items, split=role, unit=unit, on_invalid=dataset_cfg.on_invalid,
                                 sft=True, fmt=dataset_cfg.format, columns=column_map(dataset_cfg.columns),
                                 rejects_path=download_dir / f"{role}.rejects.jsonl")
    print(f"    {path}: {report.valid} of {report.rows} rows valid", flush=True)
    return rows, {"file": str(path.resolve()), "rows": report.rows, "valid": report.valid,
                  "rejected": report.rejected_lines, "rejects_file": report.rejects_file,
                  "converted": report.converted, "problems": report.to_dict()["problems"]}


def request_for(dataset_cfg) -> Dict[str, Any]:
    train = _file(dataset_cfg.train_file, "dataset.train_file", True)
    eval_ = _file(dataset_cfg.eval_file, "dataset.eval_file", False)
    return {"source": "local", "train_file": str(train.resolve()), "train_sha256": sha256_file(train),
            "eval_file": str(eval_.resolve()) if eval_ else None, "eval_sha256": sha256_file(eval_) if eval_ else None,
            "eval_percent": None if eval_ else float(dataset_cfg.eval_percent), "seed": int(dataset_cfg.seed),
            "format": dataset_cfg.format, "columns": column_map(dataset_cfg.columns),
            "on_invalid": dataset_cfg.on_invalid, "splits": list(dataset_cfg.splits),
            "train_split": dataset_cfg.train_split}


def write_local_dataset(dataset_cfg, *, force: bool = False) -> Dict[str, Any]:
    """The manifest of the four splits (from the cache when the request and the files match; `"cached"` says)."""
    from runner.data.jsonl import write_jsonl_atomic

    request = request_for(dataset_cfg)
    download_dir = Path(dataset_cfg.download_dir)
    if not force:
        manifest = cached_manifest(download_dir, request)
        if manifest:
            return {**manifest, "cached": True}
    train_rows, train_facts = _read(Path(request["train_file"]), "train", dataset_cfg, download_dir)
    sources = {"train": train_facts}
    if request["eval_file"]:
        eval_rows, sources["eval"] = _read(Path(request["eval_file"]), "eval", dataset_cfg, download_dir)
        if not eval_rows:
            raise DatasetRequestError(f"dataset.eval_file={request['eval_file']}: no valid rows to evaluate on")
        train_ids = {row_id(r) for r in train_rows}
        shared = sum(1 for r in eval_rows if row_id(r) in train_ids)
        if shared:  # eval loss on conversations trained on says little; worth knowing, not worth refusing
            print(f"    warning: {shared} of {len(eval_rows)} eval row(s) are also in dataset.train_file", flush=True)
        sources["eval"]["also_in_train"] = shared
    else:
        train_rows, eval_rows = hold_out(train_rows, float(dataset_cfg.eval_percent), int(dataset_cfg.seed))
    if not train_rows:
        raise DatasetRequestError(f"dataset.train_file={request['train_file']}: no valid rows to train on")
    written = {}
    for split in dataset_cfg.splits:
        train_side = split == dataset_cfg.train_split or split.startswith("train")
        path = download_dir / f"{split}.jsonl"
        rows, digest = write_jsonl_atomic(path, train_rows if train_side else eval_rows)
        written[split] = {"file": str(path), "rows": rows, "sha256": digest,
                          "from": "train_file" if train_side else ("eval_file" if request["eval_file"] else
                                                                    f"held out of train_file ({request['eval_percent']:g}%)")}
        print(f"    {split}: {rows} rows -> {path}", flush=True)
    return {**write_manifest(download_dir, request, written, sources=sources), "cached": False}
