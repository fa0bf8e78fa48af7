"""Cross-process locks on lock files in the state root, for runs that share one root.

`fcntl.flock` and not a pid file: the kernel releases the lock when its holder exits, however it exits (SIGKILL
included), so a crashed run never leaves a lock behind that someone has to delete by hand. A lock is held on an
open file description, so within one process the same path must not be locked twice through two opens: `hold()`
keeps one description per path for the process's life (`held()` tells whether this process holds it).
"""

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Dict, Iterator, Optional

_held: Dict[str, int] = {}  # path -> fd of the locks this process holds until it exits (hold())


class LockBusy(RuntimeError):
    """Another process holds the lock and the caller asked not to wait."""


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


def _acquire(fd: int, path: Path, wait: bool, timeout: Optional[float]) -> None:
    if not wait:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockBusy(f"{path} is locked by another process") from None
        return
    if timeout is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    end = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > end:
                raise LockBusy(f"{path} stayed locked by another process for {timeout:.0f} s") from None
            time.sleep(0.05)


@contextlib.contextmanager
def exclusive(path, *, wait: bool = True, timeout: Optional[float] = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the `with` block. A path this process already
    holds with hold() is not locked again (it would deadlock against itself)."""
    path = Path(path)
    if str(path.resolve()) in _held:
        yield
        return
    fd = _open(path)
    try:
        _acquire(fd, path, wait, timeout)
        yield
    finally:
        os.close(fd)  # closing the description releases the lock


def hold(path, *, wait: bool = False) -> None:
    """Lock `path` until this process exits (or release()). Raises LockBusy when another process holds it and
    wait is False. Holding it already is fine."""
    path = Path(path)
    key = str(path.resolve())
    if key in _held:
        return
    fd = _open(path)
    try:
        _acquire(fd, path, wait, None)
    except BaseException:
        os.close(fd)
        raise
    _held[key] = fd


def held(path) -> bool:
    return str(Path(path).resolve()) in _held


def release(path) -> None:
    fd = _held.pop(str(Path(path).resolve()), None)
    if fd is not None:
        os.close(fd)


def is_locked_elsewhere(path) -> bool:
    """Whether another process holds the lock on `path` now (a missing file is not locked)."""
    path = Path(path)
    if held(path) or not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
