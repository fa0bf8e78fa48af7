"""Files that are either whole or absent: written to a temp file in the same folder, then renamed over the target.

Every output of the runner (run record, manifests, JSONL splits, plots, plans, checkpoint markers, endpoint state
and key files) goes through here, so a crash or a kill mid-write never leaves a half file behind.
"""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional


@contextlib.contextmanager
def atomic_writer(path, mode: str = "w", *, perms: Optional[int] = None, fsync: bool = False) -> Iterator[IO]:
    """`with atomic_writer(p) as f: ...` — `p` appears only once the block has finished without error.
    `perms` sets the file mode exactly (the umask neither loosens nor tightens it, e.g. 0o600 for secrets);
    `fsync` makes the data durable before the rename (checkpoints, splits)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if perms is not None:
            os.fchmod(fd, perms)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        if perms is None:  # mkstemp creates 0600; ordinary outputs get the usual umask-derived mode
            usual_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def usual_mode(path, folder: bool = False) -> None:
    """mkstemp/mkdtemp create owner-only entries; outputs get the usual umask-derived mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if folder else 0o666) & ~umask)


@contextlib.contextmanager
def staged_dir(final, verify: Optional[Callable[[Path], None]] = None, *, keep_existing: bool = False
               ) -> Iterator[Path]:
    """The folder version of atomic_writer: `with staged_dir(p) as tmp:` fill tmp (beside p, so the rename stays on
    one file system); on leaving, verify(tmp) runs and tmp is renamed to p. On any failure tmp is removed and p is
    left as it was. An existing p is replaced, or with `keep_existing` kept (a cache another process filled for the
    same key meanwhile: theirs is as good)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    old = None
    try:
        yield tmp
        if verify is not None:
            verify(tmp)
        usual_mode(tmp, folder=True)
        if final.exists() and keep_existing:
            return
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True)


def write_text(path, text: str, *, perms: Optional[int] = None, fsync: bool = False) -> Path:
    with atomic_writer(path, "w", perms=perms, fsync=fsync) as f:
        f.write(text)
    return Path(path)


def write_bytes(path, data: bytes, *, fsync: bool = False) -> Path:
    with atomic_writer(path, "wb", fsync=fsync) as f:
        f.write(data)
    return Path(path)


def write_json(path, data: Any, *, indent: int = 2) -> Path:
    return write_text(path, json.dumps(data, indent=indent, default=str, ensure_ascii=False) + "\n")


def save_figure(fig, path, *, dpi: int = 100) -> Path:
    """A matplotlib figure as PNG."""
    with atomic_writer(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    return Path(path)


def sha256_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
