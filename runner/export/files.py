"""Outputs that are whole or absent: every export file or folder is written under a temporary name beside its
final one, checked, and only then renamed; the disk is checked for room before anything is written."""

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

from runner.atomic import sha256_file, usual_mode
from runner.atomic import staged_dir as atomic_staged_dir
from runner.export.errors import ExportError

# Headroom kept free beyond the estimate: a full disk mid-write corrupts other runs' files too.
SPACE_MARGIN_BYTES = 64 << 20


def tree_size(path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_free_space(folder, needed_bytes: int, what: str) -> None:
    """Refuse before writing when the file system holding folder has less than needed_bytes (+ a margin) free."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed_bytes + SPACE_MARGIN_BYTES:
        raise ExportError(f"not enough disk space for {what}: about {_human(needed_bytes)} needed (plus "
                          f"{_human(SPACE_MARGIN_BYTES)} headroom), {_human(free)} free under {probe}; free some "
                          f"space or set export.output_dir to a larger disk")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_size(n: int) -> str:
    return _human(n)


def _disk_full(exc: OSError) -> bool:
    return getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)


def _raise_if_disk_full(exc: OSError, what: str, final: Path) -> None:
    """A full disk while staging is said as such (nothing was left under the final name); other errors go on."""
    if _disk_full(exc):
        raise ExportError(f"the disk filled up while writing {what} ({exc.strerror}); nothing was left "
                          f"under {final}") from exc


@contextlib.contextmanager
def staged_file(final, verify: Optional[Callable[[Path], None]] = None) -> Iterator[Path]:
    """`with staged_file(p) as tmp:` write tmp; on leaving, verify(tmp) runs, then tmp is renamed to p.
    On any failure tmp is removed and p is left as it was (absent, or the previous whole file)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if verify is not None:
            verify(tmp)
        usual_mode(tmp)
        os.replace(tmp, final)
    except OSError as exc:
        _raise_if_disk_full(exc, final.name, final)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def staged_dir(final, verify: Optional[Callable[[Path], None]] = None) -> Iterator[Path]:
    """runner.atomic.staged_dir, with a full disk said as such."""
    try:
        with atomic_staged_dir(final, verify) as tmp:
            yield tmp
    except OSError as exc:
        _raise_if_disk_full(exc, f"{Path(final).name}/", Path(final))
        raise


def describe(path) -> dict:
    """What the run record keeps of an output: path, bytes and sha256 (of each file, for a folder)."""
    path = Path(path)
    if path.is_file():
        return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    files = {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}
    return {"path": str(path), "bytes": tree_size(path), "files": files}
