"""Checkpoints that are either complete or ignored.

transformers' Trainer writes `checkpoint-<step>/` file by file, so a kill mid-save leaves a folder that looks like a
checkpoint but is not. After the Trainer has written everything, a manifest (`COMPLETE.json`: every file and its
size) is written atomically into the folder. A checkpoint counts only if its manifest is there and every file it
lists is present with that size — which also catches a folder half-deleted by checkpoint rotation. Resuming picks
the newest such checkpoint and deletes the rest of the unusable folders first.
"""

import json
import os
import re
import shutil
from pathlib import Path
from typing import List, Optional

from runner.atomic import write_text

MARKER = "COMPLETE.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def write_atomic(path, text: str) -> None:
    """Checkpoint metadata is made durable (fsync) before it is renamed into place."""
    write_text(path, text, fsync=True)


def mark_complete(checkpoint_dir, step: int) -> None:
    checkpoint_dir = Path(checkpoint_dir)
    files = {
        str(p.relative_to(checkpoint_dir)): p.stat().st_size
        for p in sorted(checkpoint_dir.rglob("*"))
        if p.is_file() and p.name != MARKER and not p.name.startswith(".")
    }
    write_atomic(checkpoint_dir / MARKER, json.dumps({"global_step": step, "files": files}, indent=1))


def is_complete(checkpoint_dir) -> bool:
    checkpoint_dir = Path(checkpoint_dir)
    try:
        manifest = json.loads((checkpoint_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    for name, size in manifest.get("files", {}).items():
        path = checkpoint_dir / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return bool(manifest.get("files"))


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
