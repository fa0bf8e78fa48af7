"""A broken MLflow store is refused at `connect`, naming the file; nothing in the state root is deleted or replaced;
`mlflow.repair_store=true` recovers what can be recovered (runner/local/store.py)."""

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from runner.local import store

from tests.conftest import REPO



@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    """A complete, current MLflow store built once (MLflow's migrations take seconds)."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    store.build_new_store(db)
    return db


def _ftrun(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FTRUN_HOME": str(home), "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "runner.cli", "steps=[connect]", f"hydra.run.dir={home.parent}/run-{len(list(home.parent.glob('run-*')))}",
                           *args], cwd=home.parent, env=env, capture_output=True, text=True, timeout=300)


def _snapshot(root: Path) -> dict:
    """The store's files and the run artifacts: what a refusal must leave exactly as it was."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else "dir"
            for p in sorted([*root.glob("*mlflow.db*"), *root.rglob("mlartifacts/**/*")])
            if not p.name.endswith(".lock")}


def _state_with(home: Path, db_bytes: bytes) -> Path:
    (home / "mlartifacts" / ("a" * 32) / "artifacts").mkdir(parents=True)  # a run an earlier store knew
    (home / "mlflow.db").write_bytes(db_bytes)
    return home / "mlflow.db"


def _refused_at_connect(home: Path, db: Path) -> None:
    before = _snapshot(home)
    proc = _ftrun(home)
    assert proc.returncode == 2, proc.stderr
    message = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(message) <= 4 and "Traceback" not in proc.stderr, proc.stderr
    assert str(db) in proc.stderr and store.REPAIR_HINT in proc.stderr
    assert _snapshot(home) == before  # nothing deleted, nothing replaced, no new store


@pytest.mark.slow
def test_garbage_store_is_refused_and_repair_moves_it_aside(tmp_path):
    home = tmp_path / "home"
    garbage = os.urandom(4096)
    db = _state_with(home, garbage)
    _refused_at_connect(home, db)
    proc = _ftrun(home, f"{'mlflow.repair_store'}=true")
    assert proc.returncode == 0, proc.stderr
    assert "moved aside" in proc.stdout and "not recovered" in proc.stdout
    kept = list(home.glob("mlflow.db.broken-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == garbage  # the broken file is kept, not deleted
    assert store.inspect_store(db)["state"] == "ok"
    assert _ftrun(home).returncode == 0  # the next run connects


def test_zero_byte_store_is_refused_not_recreated(tmp_path):
    home = tmp_path / "home"
    db = _state_with(home, b"")
    _refused_at_connect(home, db)
    assert db.stat().st_size == 0


def test_missing_store_with_earlier_runs_is_not_recreated(tmp_path):
    home = tmp_path / "home"
    db = _state_with(home, b"")
    db.unlink()
    with pytest.raises(store.StoreBroken, match="show that a store existed"):
        store.check_store(f"sqlite:///{db}", str(home / "mlartifacts"))
    assert not db.exists()


def _half_migrated(good_store: Path, dest: Path) -> Path:
    """What a set-up stopped by a full disk left: an older revision and alembic's temp table."""
    shutil.copy2(good_store, dest)
    con = sqlite3.connect(dest)
    con.execute("UPDATE alembic_version SET version_num = 'cc1f77228345'")
    con.execute("CREATE TABLE _alembic_tmp_model_version_tags (key VARCHAR(250))")
    con.commit()
    con.close()
    return dest


@pytest.mark.slow
def test_half_migrated_store_is_refused_then_repaired(tmp_path, good_store):
    home = tmp_path / "home"
    home.mkdir()
    db = _half_migrated(good_store, home / "mlflow.db")
    original = db.read_bytes()
    found = store.inspect_store(db)
    assert found["state"] == "half_migrated" and "_alembic_tmp_model_version_tags" in found["detail"]
    with pytest.raises(store.StoreBroken, match=r"mlflow\.db cannot be used.*\n.*repair_store=true"):
        store.check_store(f"sqlite:///{db}", str(home / "mlartifacts"))
    assert db.read_bytes() == original
    said = store.repair_store(f"sqlite:///{db}", str(home / "mlartifacts"))
    backups = list(home.glob("mlflow.db.bak-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == original, said  # the copy before the migration
    assert store.inspect_store(db)["state"] == "ok"
    assert not list(home.glob(".mlflow.db.*"))  # no work copies left behind


@pytest.mark.slow
def test_interrupted_set_up_leaves_no_store(tmp_path, monkeypatch):
    """A disk that fills (or a kill) while a new store is set up leaves no half-built store at the target."""
    db = tmp_path / "mlflow.db"

    def fill_disk(path):
        Path(path).write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "_initialise", fill_disk)
    with pytest.raises(store.StoreBroken, match="Free space"):
        store.build_new_store(db)
    assert not db.exists() and not list(tmp_path.iterdir())
    monkeypatch.undo()
    store.build_new_store(db)  # once space is free, the next run sets it up
    assert store.inspect_store(db)["state"] == "ok"


@pytest.mark.slow
def test_corrupt_pages_are_found_by_the_integrity_check(tmp_path, good_store):
    db = tmp_path / "mlflow.db"
    data = bytearray(good_store.read_bytes())
    data[4096 * 3: 4096 * 3 + 512] = os.urandom(512)  # a page in the middle overwritten
    db.write_bytes(bytes(data))
    assert store.inspect_store(db)["state"] in ("corrupt",)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["zero bytes", "missing"])
def test_repair_of_an_emptied_or_missing_store_says_what_is_lost(tmp_path, fault):
    home = tmp_path / "home"
    db = _state_with(home, b"")
    if fault == "missing":
        db.unlink()
    said = store.repair_store(f"sqlite:///{db}", str(home / "mlartifacts"))
    assert store.inspect_store(db)["state"] == "ok"
    assert any("not recovered" in line and "1 run(s)" in line for line in said), said
    assert (home / "mlartifacts" / ("a" * 32)).is_dir()  # the earlier run's files are untouched
    if fault == "zero bytes":
        assert len(list(home.glob("mlflow.db.broken-*"))) == 1
