"""Short messages for the failures a user can act on that are not the runner's own refusals: a full disk, a broken
store, a missing file or folder, a permission. The console gets what failed, which file or folder, and what to do;
the traceback goes to `<run dir>/ftrun.log` only (runner/cli.py). Anything not recognised here keeps its traceback:
it is a bug to fix, not a fault to explain.
"""

import errno
import re
import shutil
from pathlib import Path
from typing import Iterator, Optional

DISK_FULL = ("no space left on device", "database or disk is full", "disk quota exceeded")
NOT_A_DATABASE = ("file is not a database", "database disk image is malformed", "file is encrypted or is not a database")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _free(folder: Path) -> str:
    for candidate in [folder, *folder.parents]:
        if candidate.exists():
            return f"{shutil.disk_usage(candidate).free / 1e9:.2f} GB free in {candidate}"
    return "free space unknown"


def _filename(exc: BaseException) -> Optional[str]:
    for link in _chain(exc):
        name = getattr(link, "filename", None)
        if name:
            return str(name)
    return None


def short_failure(exc: BaseException, store_file: Optional[str] = None, state_root: Optional[str] = None
                  ) -> Optional[str]:
    """A few lines for a recognised fault, or None (the caller keeps the traceback)."""
    texts = " | ".join(f"{type(e).__name__}: {e}" for e in _chain(exc)).lower()
    filename = _filename(exc)
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in _chain(exc)) or any(
            t in texts for t in DISK_FULL):
        where = Path(filename or store_file or state_root or ".")
        writing = f"writing {where}" if (filename or store_file) else "writing"
        if "database or disk is full" in texts and store_file:
            writing = f"writing the MLflow store {store_file}"
        return (f"the disk is full: {writing} failed ({_free(where.parent if where.suffix else where)}).\n"
                "  Free space there (old checkpoints under <state root>/training, endpoint logs, merged models), then "
                "run again; a run resumes from its last checkpoint with finetune.resume_from_checkpoint=true.")
    if any(t in texts for t in NOT_A_DATABASE):
        return (f"the MLflow store {store_file or '(tracking store)'} is not a usable SQLite database.\n"
                "  Restore it from a backup, or run `ftrun steps=[connect] mlflow.repair_store=true`: it moves the "
                "broken file aside and says what could not be recovered.")
    match = re.search(r"no such artifact: '?([^'|]*)'?", texts)
    if match or any(isinstance(e, FileNotFoundError) for e in _chain(exc)):
        what = filename or (match.group(1) if match else "") or "(a registered model's folder)"
        return (f"a file or folder the run needs is missing: {what}.\n"
                "  It was deleted or moved: restore it, or run the step that makes it again (e.g. steps=[register] "
                "from_run=<run dir> for a registered model).")
    if any(isinstance(e, PermissionError) for e in _chain(exc)):
        return (f"permission denied: {filename or 'a file of the run'}.\n"
                "  Make it writable for this user, or point paths.root / hydra.run.dir elsewhere.")
    return None
