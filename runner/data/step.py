"""The data step, the same on both backends: get the splits (hub/local download, the user's own file with
dataset=local, or the offline sample), convert them to messages rows and validate every row, explore, and say where
everything is."""

from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import OmegaConf

from runner.atomic import sha256_file
from runner.data.formats import column_map
from runner.data.download import (MANIFEST, DatasetRequestError, cached_manifest, check_split_percent,
                                   download_splits, update_manifest)


def _files(dataset_cfg) -> Dict[str, str]:
    return {s: str(Path(dataset_cfg.download_dir) / f"{s}.jsonl") for s in dataset_cfg.splits}


def _role_files(dataset_cfg, files: Dict[str, str]) -> Dict[str, str]:
    for role in ("train_split", "test_split", "sample_split"):
        split = dataset_cfg[role]
        if split not in files:
            raise DatasetRequestError(f"dataset.{role}={split!r} is not one of dataset.splits={list(dataset_cfg.splits)}")
    return {"train_file": files[dataset_cfg.train_split], "test_file": files[dataset_cfg.test_split],
            "sample_file": files[dataset_cfg.sample_split]}


def get_splits(dataset_cfg) -> Dict[str, Any]:
    """The manifest for the configured request, from the cache when it matches (unless dataset.force)."""
    if dataset_cfg.source == "sample":
        from runner.data.sample import write_sample_dataset

        sample_rows = {s: int(dataset_cfg.sample_rows.get(s, 0)) for s in dataset_cfg.splits}
        missing = [s for s, n in sample_rows.items() if n <= 0]
        if missing:
            raise DatasetRequestError(f"dataset.sample_rows has no row count for split(s) {missing} "
                                      f"(e.g. dataset.sample_rows.{missing[0]}=64)")
        request = {"source": "sample", "seed": int(dataset_cfg.seed), "sample_rows": sample_rows,
                   "split_percent": 100.0}
        cached = None if dataset_cfg.force else cached_manifest(dataset_cfg.download_dir, request)
        if cached:
            return {**cached, "cached": True}
        return {**write_sample_dataset(dataset_cfg.download_dir, sample_rows, int(dataset_cfg.seed)), "cached": False}
    if dataset_cfg.source == "local":
        from runner.data.local import write_local_dataset

        return write_local_dataset(dataset_cfg, force=bool(dataset_cfg.force))
    return download_splits(dataset_cfg.name, list(dataset_cfg.splits), dataset_cfg.split_percent,
                           dataset_cfg.download_dir, subset=dataset_cfg.subset, force=dataset_cfg.force,
                           columns=column_map(dataset_cfg.columns))


def validate_splits(download_dir, files: Dict[str, str], on_invalid: str,
                    manifest: Optional[Dict[str, Any]] = None, *, fmt: str = "messages",
                    columns: Optional[Dict[str, str]] = None) -> Dict[str, Dict[str, Any]]:
    """Validate every split (see runner.data.validate), converting rows of another format to messages rows.
    Rows dropped in skip mode and splits rewritten as messages rows are recorded in the manifest (with the file's
    new rows and sha256), so the manifest describes the files on disk, the next run is still a cache hit (and reads
    the converted file as messages rows), and it can still say how many rows were dropped."""
    from runner.data.validate import validate_file

    recorded = (manifest or {}).get("splits", {})
    reports, changes = {}, {}
    for split, path in files.items():
        converted_before = recorded.get(split, {}).get("converted", False)
        report = validate_file(path, split, on_invalid=on_invalid, fmt="messages" if converted_before else fmt,
                               columns=None if converted_before else columns).to_dict()
        if report["rejected"] or report["converted"]:
            changes[split] = {"rows": report["valid"], "sha256": sha256_file(path)}
            if report["converted"]:
                changes[split]["converted"] = True
            if report["rejected"]:
                changes[split].update(rejected=report["rejected"], rejects_file=report["rejects_file"])
        if not report["rejected"] and recorded.get(split, {}).get("rejected"):  # dropped by an earlier run
            report["rejected"] = recorded[split]["rejected"]
            report["rejects_file"] = recorded[split].get("rejects_file")
        reports[split] = report
    if changes:
        update_manifest(download_dir, changes)
    return reports


def run_data_step(dataset_cfg, *, run_dir, max_seq_length: Optional[int] = None, tokenizer_dir: Optional[str] = None,
                  dry_run: bool = False) -> Dict[str, Any]:
    from runner.data.explore import explore

    check_split_percent(dataset_cfg.split_percent)
    files = _files(dataset_cfg)
    roles = _role_files(dataset_cfg, files)
    base = {"download_dir": str(Path(dataset_cfg.download_dir).resolve()), "files": files, **roles,
            "manifest": str(Path(dataset_cfg.download_dir) / MANIFEST)}
    if dry_run:
        return {**base, "planned": True}

    from runner.locks import exclusive

    # The split files live in the shared state root: two runs writing or validating (on_invalid=skip rewrites a
    # file) them at once take turns, and each reads back files no other run is changing.
    download_dir = Path(base["download_dir"])
    with exclusive(download_dir.with_name(f".{download_dir.name}.lock")):
        manifest = get_splits(dataset_cfg)
        cached = manifest.pop("cached", False)
        print(f"    {'cached' if cached else 'written'}: {base['download_dir']}", flush=True)
        validation = validate_splits(dataset_cfg.download_dir, files, dataset_cfg.on_invalid, manifest,
                                     fmt=dataset_cfg.format, columns=column_map(dataset_cfg.columns))
        manifest_sha256 = sha256_file(base["manifest"])
        files_sha256 = {s: sha256_file(p) for s, p in files.items()}
    exploration = explore(files, Path(run_dir) / "data", tokenizer_dir=tokenizer_dir, max_seq_length=max_seq_length)
    return {
        **base,
        "manifest_sha256": manifest_sha256,
        "files_sha256": files_sha256,
        "rows": {s: v["valid"] for s, v in validation.items()},
        "rejected": {s: v["rejected"] for s, v in validation.items()},
        "rejects_files": {s: v["rejects_file"] for s, v in validation.items() if v["rejects_file"]},
        "exploration": {k: exploration[k] for k in ("summary_json", "summary_md", "plot")},
        "cached": cached,
        **({"sources": manifest["sources"]} if manifest.get("sources") else {}),
        "request": OmegaConf.to_container(dataset_cfg, resolve=True),
    }
