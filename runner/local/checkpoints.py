"""Checkpoints that are either complete or ignored.

transformers' Trainer writes `checkpoint-<step>/` file by file, so a kill mid-save leaves a folder that looks like a
checkpoint but is not. After the Trainer has written everything, a manifest (`COMPLETE.json`: every file, its size
and its sha256) is written atomically into the folder. A checkpoint counts only if its manifest is there and every
file it lists is present with that size — which also catches a folder half-deleted by checkpoint rotation. Resuming
picks the newest such checkpoint whose files also hash to their recorded sha256 (a disk or copy fault can change
bytes without changing a size): a corrupt one is removed with a warning and the one before it is used. The sizes
are checked wherever a checkpoint is listed (cheap); the hashes once, when a run resumes.
"""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from runner.atomic import write_text

MARKER = "COMPLETE.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def write_atomic(path, text: str) -> None:
    """Checkpoint metadata is made durable (fsync) before it is renamed into place."""
    write_text(path, text, fsync=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mark_complete(checkpoint_dir, step: int) -> None:
    checkpoint_dir = Path(checkpoint_dir)
    files = {
        str(p.relative_to(checkpoint_dir)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(checkpoint_dir.rglob("*"))
        if p.is_file() and p.name != MARKER and not p.name.startswith(".")
    }
    write_atomic(checkpoint_dir / MARKER, json.dumps({"global_step": step, "files": files}, indent=1))


def _manifest_files(checkpoint_dir: Path) -> Optional[Dict[str, dict]]:
    """name -> {"size", "sha256"?} from the manifest (an older manifest holds sizes only); None without one."""
    try:
        manifest = json.loads((checkpoint_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return None
    return {name: entry if isinstance(entry, dict) else {"size": entry} for name, entry in files.items()}


def is_complete(checkpoint_dir) -> bool:
    checkpoint_dir = Path(checkpoint_dir)
    files = _manifest_files(checkpoint_dir)
    if not files:
        return False
    for name, entry in files.items():
        path = checkpoint_dir / name
        if not path.is_file() or path.stat().st_size != entry.get("size"):
            return False
    return True


def corrupt_file(checkpoint_dir) -> Optional[str]:
    """The first file of a complete checkpoint whose bytes no longer hash to the manifest's sha256, or None (also
    for an older manifest without hashes, which cannot say)."""
    checkpoint_dir = Path(checkpoint_dir)
    for name, entry in (_manifest_files(checkpoint_dir) or {}).items():
        if not entry.get("sha256"):
            continue
        try:
            if _sha256(checkpoint_dir / name) != entry["sha256"]:
                return name
        except FileNotFoundError:  # another rank of the same run removed it meanwhile
            return name
    return None


def checkpoint_step(path) -> Optional[int]:
    match = _CHECKPOINT.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(checkpoints_dir) -> List[Path]:
    """checkpoint-<step> folders, oldest first."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def latest_complete(checkpoints_dir) -> Optional[Path]:
    complete = [p for p in list_checkpoints(checkpoints_dir) if is_complete(p)]
    return complete[-1] if complete else None


def latest_intact(checkpoints_dir) -> Tuple[Optional[Path], List[str]]:
    """(the newest complete checkpoint whose files match their checksums, warnings about the newer ones that did
    not). Those corrupt ones are removed: the resumed run writes those steps again."""
    warnings = []
    for path in reversed([p for p in list_checkpoints(checkpoints_dir) if is_complete(p)]):
        bad = corrupt_file(path)
        if bad is None:
            return path, warnings
        doomed = path.with_name(f".tmp-corrupt-{path.name}")
        try:
            os.replace(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        except FileNotFoundError:  # torchrun: every rank resumes, one of them removed it first
            pass
        warnings.append(f"checkpoint {path.name} is corrupt ({bad} does not match the sha256 in its {MARKER}): "
                        f"removed, not resumed from")
    return None, warnings


def remove_incomplete(checkpoints_dir) -> List[str]:
    """Delete checkpoint folders that are not complete (and leftover temp folders); returns their names."""
    removed = []
    root = Path(checkpoints_dir)
    for path in list_checkpoints(root):
        if not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(".tmp-"):
                shutil.rmtree(path, ignore_errors=True)
    return removed


def replace_dir_atomically(src, dest) -> None:
    """Move a fully written folder `src` to `dest`, replacing what was there, never leaving `dest` half-written."""
    src, dest = Path(src), Path(dest)
    if dest.exists():
        old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
        os.replace(dest, old)
        os.replace(src, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dest)


def rotate(checkpoints_dir, keep: Optional[int], protect: Optional[str] = None) -> List[str]:
    """Keep the newest `keep` complete checkpoints (plus `protect`, e.g. the best one); None/0 keeps all.
    A victim is renamed away first, so a kill mid-delete never leaves a half-deleted checkpoint-<step>."""
    if not keep or keep < 1:
        return []
    complete = [p for p in list_checkpoints(checkpoints_dir) if is_complete(p)]
    deleted = []
    for path in complete[:-keep]:
        if path.name == protect:
            continue
        doomed = path.with_name(f".tmp-del-{path.name}")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(path.name)
    return deleted
