"""The MLflow SQLite store, opened and checked before anything uses it; set up and migrated so that neither can be
left half-done; repaired on request (`mlflow.repair_store=true`).

Why: MLflow itself creates a store wherever the file is missing or empty (so a truncated store silently became a
new, empty registry that handed out version 1 again), fails deep inside training on a file that is not a database,
and leaves a store half-migrated when the disk fills during set-up (every later run then fails). Here:
- a store file that is empty, not SQLite, fails `PRAGMA integrity_check`, holds alembic's leftover `_alembic_tmp_*`
  tables, or has another schema revision than this MLflow's is refused, naming the file and the recovery;
- a missing store is created only when nothing in the state root shows that one existed (run artifact folders);
- a new store is built in a temporary file beside the target and renamed over it only when complete; a migration
  runs on a copy, after a backup copy is kept, and replaces the store only when it succeeded.
Nothing here deletes a store: a broken one is renamed aside (`<db>.broken-<time>`) by the repair.
"""

import contextlib
import os
import re
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Iterator, List, Optional

from runner.errors import RunnerError

SQLITE_HEADER = b"SQLite format 3\x00"
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
REPAIR_HINT = "mlflow.repair_store=true"



def sqlite_file(tracking_uri: str) -> Optional[Path]:
    """The database file of a sqlite:/// URI (None for a server or another database)."""
    match = re.match(r"^sqlite:///(.+?)(\?.*)?$", tracking_uri)
    return Path(match.group(1)) if match else None


@contextlib.contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Exclusive across processes for a SQLite store (`<db>.lock` beside it); nothing for other stores, whose
    servers serialise their own writes."""
    from runner.locks import exclusive

    db = sqlite_file(tracking_uri)
    if db is None:
        yield
        return
    with exclusive(db.with_name(db.name + ".lock")):
        yield


_checked: set = set()  # tracking URIs whose store this process has checked and found sound


class StoreBroken(RunnerError):
    """The MLflow store cannot be used as it is; the message names the file and what to do."""


def head_revision() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def inspect_store(db: Path) -> dict:
    """{"state": ok | missing | empty | not_sqlite | corrupt | half_migrated | other_schema, "detail": str}.
    Read-only: opens the file with mode=ro and changes nothing."""
    db = Path(db)
    if not db.exists():
        return {"state": "missing", "detail": "the file does not exist"}
    size = db.stat().st_size
    if size == 0:
        return {"state": "empty", "detail": "the file is 0 bytes"}
    with open(db, "rb") as f:
        header = f.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        return {"state": "not_sqlite", "detail": f"the file ({size:,} bytes) is not a SQLite database"}
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=20)
        try:
            problems = [row[0] for row in con.execute("PRAGMA integrity_check").fetchall()]
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            revision = None
            if "alembic_version" in tables:
                row = con.execute("SELECT version_num FROM alembic_version").fetchone()
                revision = row[0] if row else None
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        return {"state": "corrupt", "detail": f"SQLite cannot read it ({exc})"}
    if problems != ["ok"]:
        return {"state": "corrupt", "detail": "PRAGMA integrity_check: " + "; ".join(problems[:3])}
    leftovers = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
    if leftovers:
        return {"state": "half_migrated", "revision": revision,
                "detail": f"a migration stopped part way (leftover table(s) {', '.join(leftovers)})"}
    head = head_revision()
    if revision != head:
        return {"state": "other_schema", "revision": revision,
                "detail": f"schema revision {revision or 'none'}, this MLflow needs {head}"}
    return {"state": "ok", "revision": revision, "detail": "ok"}


def evidence_of_store(artifact_location: Optional[str]) -> List[str]:
    """Run artifact folders (<artifact root>/<32-hex run id>/): a store existed that knew these runs."""
    if not artifact_location:
        return []
    root = Path(artifact_location)
    if not root.is_dir():
        return []
    return sorted(str(p) for p in root.iterdir() if p.is_dir() and RUN_ID.match(p.name))


def _refusal(db: Path, found: dict, evidence: List[str]) -> str:
    lines = [f"the MLflow store {db} cannot be used: {found['detail']}."]
    if found["state"] == "missing":
        lines.append(f"{len(evidence)} run artifact folder(s) under {Path(evidence[0]).parent} show that a store "
                     "existed; a new empty one is not created over them (it would hand out version 1 again).")
    if found["state"] in ("other_schema", "half_migrated"):
        lines.append(f"Run again with {REPAIR_HINT}: it keeps a copy of the file, migrates another copy and "
                     "replaces the store only if that succeeded.")
    else:
        lines.append(f"Restore {db.name} from a backup, or run again with {REPAIR_HINT}: it moves the broken file "
                     "aside (nothing is deleted), starts a new store and lists what could not be recovered.")
    return "\n  ".join(lines)


def check_store(tracking_uri: str, artifact_location: Optional[str]) -> Optional[dict]:
    """Refuses (StoreBroken) a store that cannot be used; creates a missing one (built aside, then renamed) when
    nothing shows one existed. None for stores that are not SQLite files (a server checks its own)."""
    db = sqlite_file(tracking_uri)
    if db is None:
        return None
    if tracking_uri in _checked and db.exists():  # once per process (connect, then the first client)
        return {"state": "ok", "detail": "checked before in this process"}
    found = inspect_store(db)
    if found["state"] == "ok":
        _checked.add(tracking_uri)
    if found["state"] == "missing":
        evidence = evidence_of_store(artifact_location)
        if evidence:
            raise StoreBroken(_refusal(db, found, evidence))
        build_new_store(db)
        _checked.add(tracking_uri)
        return {"state": "created", "detail": "a new store"}
    if found["state"] != "ok":
        raise StoreBroken(_refusal(db, found, []))
    return found


def _sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path}"


def _initialise(path: Path) -> None:
    """MLflow's tables at the newest revision, in a fresh file."""
    from mlflow.store.db.utils import _initialize_tables, create_sqlalchemy_engine

    from runner.quiet import quiet_mlflow

    quiet_mlflow()  # its migrations log at INFO: not actionable
    engine = create_sqlalchemy_engine(_sqlite_uri(path))
    try:
        _initialize_tables(engine)
    finally:
        engine.dispose()


def _replace(tmp: Path, db: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, db)


def _aside(db: Path, label: str) -> Path:
    return db.with_name(f".{db.name}.{label}-{os.getpid()}")


def build_new_store(db: Path) -> None:
    """A new store at `db`, built in a temporary file beside it and renamed over it only when complete and checked:
    a disk that fills or a kill during set-up leaves at most a temporary file, never a half-migrated store."""
    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = _aside(db, "new")
    tmp.unlink(missing_ok=True)
    try:
        _initialise(tmp)
        found = inspect_store(tmp)
        if found["state"] != "ok":
            raise StoreBroken(f"setting up a new MLflow store at {db} failed: {found['detail']}")
        _replace(tmp, db)
    except Exception as exc:
        if isinstance(exc, StoreBroken):
            raise
        raise StoreBroken(f"setting up a new MLflow store at {db} failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); nothing was written there. Free space "
                          f"in {db.parent} if the disk is full, then run again.") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _migrate_copy(db: Path) -> Path:
    """A migrated copy of `db` (leftover alembic temp tables dropped first); the original is not touched."""
    from mlflow.store.db.utils import _upgrade_db, create_sqlalchemy_engine

    from runner.quiet import quiet_mlflow

    quiet_mlflow()

    work = _aside(db, "migrating")
    shutil.copy2(db, work)
    con = sqlite3.connect(work)
    try:
        for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type='table' AND name LIKE '\\_alembic\\_tmp\\_%' "
                                   "ESCAPE '\\'").fetchall():
            con.execute(f'DROP TABLE "{name}"')
        con.commit()
    finally:
        con.close()
    engine = create_sqlalchemy_engine(_sqlite_uri(work))
    try:
        _upgrade_db(engine)
    finally:
        engine.dispose()
    found = inspect_store(work)
    if found["state"] != "ok":
        raise StoreBroken(found["detail"])
    return work


def _holds_data(db: Path) -> bool:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return any(con.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone() for t in ("runs", "registered_models"))
        finally:
            con.close()
    except sqlite3.DatabaseError:
        return True  # unknown: treat as precious


def repair_store(tracking_uri: str, artifact_location: Optional[str]) -> List[str]:
    """Recover what can be recovered; returns lines saying what was done and what could not be recovered."""
    db = sqlite_file(tracking_uri)
    if db is None:
        return [f"{tracking_uri} is not a SQLite store: nothing to repair here"]
    found = inspect_store(db)
    if found["state"] == "ok":
        return [f"MLflow store {db}: ok, nothing to repair"]
    if found["state"] == "missing" and not evidence_of_store(artifact_location):
        build_new_store(db)
        return [f"MLflow store {db}: created"]
    said = [f"MLflow store {db}: {found['detail']}"]
    if found["state"] in ("other_schema", "half_migrated"):
        backup = db.with_name(f"{db.name}.bak-{_stamp()}")
        shutil.copy2(db, backup)
        said.append(f"copy kept at {backup}")
        try:
            work = _migrate_copy(db)
        except Exception as exc:
            _aside(db, "migrating").unlink(missing_ok=True)
            if _holds_data(db):
                raise StoreBroken(f"migrating a copy of {db} failed ({type(exc).__name__}: {exc}); the store is "
                                  f"unchanged and a copy is at {backup}. It holds runs or registered models: "
                                  "recover them with `mlflow db upgrade` by hand, or move the file aside.") from exc
            said.append(f"the migration failed on a copy ({type(exc).__name__}); the store held no runs and no "
                        "registered models, so a new one replaces it")
            build_new_store(db)
            return said
        _replace(work, db)
        said.append(f"migrated to revision {head_revision()}; nothing was lost")
        return said
    if found["state"] != "missing":  # empty, not SQLite, corrupt: moved aside, never deleted
        broken = db.with_name(f"{db.name}.broken-{_stamp()}")
        os.replace(db, broken)
        said.append(f"moved aside to {broken} (kept for forensics; delete it yourself when done)")
    build_new_store(db)
    said.append("a new, empty store replaces it")
    lost = evidence_of_store(artifact_location)
    if lost:
        said.append(f"not recovered: the tracking data and registry entries of {len(lost)} run(s); their files stay "
                    f"under {Path(lost[0]).parent}. Records that registered a model now name a version the new "
                    "registry does not hold: deploy refuses them (the model identity check); run finetune and "
                    "register again to serve one")
    return said


def open_store(tracking_uri: str, artifact_location: Optional[str], *, repair: bool = False) -> List[str]:
    """The connect step's check: the store opened and checked (or repaired when asked), under the store lock."""
    with store_lock(tracking_uri):
        if repair:
            return repair_store(tracking_uri, artifact_location)
        found = check_store(tracking_uri, artifact_location)
    if found is None:
        return []
    what = "new store created" if found["state"] == "created" else f"integrity ok, schema {found.get('revision')}"
    return [f"MLflow store checked: {what}"]
