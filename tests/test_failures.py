"""Store, artifact and disk failures reach the console as a short message (what failed, which file, what to do);
the traceback goes to ftrun.log only (runner/failures.py, runner/cli.py). Each fault is raised for real here."""

import os
import sqlite3

import pytest

from runner import cli
from runner.console_log import ConsoleLog
from tests.conftest import compose_cfg


def _no_space(tmp_path):
    with open("/dev/full", "w") as f:  # the kernel's always-full device: a real ENOSPC
        f.write("x")
        f.flush()


def _sqlite_full(tmp_path):
    con = sqlite3.connect(tmp_path / "x.db")
    con.execute("CREATE TABLE t (x)")
    con.execute("PRAGMA max_page_count=2")
    for _ in range(100):
        con.execute("INSERT INTO t VALUES (?)", ("x" * 1000,))


def _not_a_database(tmp_path):
    import sqlalchemy

    (tmp_path / "g.db").write_bytes(os.urandom(4096))
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'g.db'}")
    with engine.connect() as con:
        con.execute(sqlalchemy.text("SELECT * FROM sqlite_master")).fetchall()


def _no_such_artifact(tmp_path):
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    LocalArtifactRepository(str(tmp_path / "deleted-model")).download_artifacts("")


def _autoflush_disk_full(tmp_path):
    """SQLAlchemy's wrapping of a full disk during an autoflush: the misleading message seen in the issue."""
    import sqlalchemy
    from sqlalchemy.orm import Session, declarative_base

    Base = declarative_base()

    class Row(Base):
        __tablename__ = "rows"
        id = sqlalchemy.Column(sqlalchemy.Integer, primary_key=True)
        text = sqlalchemy.Column(sqlalchemy.String)

    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'a.db'}")
    Base.metadata.create_all(engine)
    with Session(engine) as session:
        session.execute(sqlalchemy.text("PRAGMA max_page_count=3"))
        for i in range(200):
            session.add(Row(text="x" * 2000))
            session.query(Row).filter(Row.id == i).all()  # Query-invoked autoflush


FAULTS = {
    "no space left": (_no_space, "the disk is full"),
    "database or disk is full": (_sqlite_full, "the disk is full"),
    "autoflush on a full disk": (_autoflush_disk_full, "the disk is full"),
    "file is not a database": (_not_a_database, "is not a usable SQLite database"),
    "no such artifact": (_no_such_artifact, "is missing"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_console_gets_a_short_message_and_the_log_the_traceback(fault, tmp_path, monkeypatch, capfd):
    raise_it, expected = FAULTS[fault]
    cfg = compose_cfg()

    def failing_run(*args, **kwargs):
        raise_it(tmp_path)

    monkeypatch.setattr("runner.workflow.run", failing_run)
    with pytest.raises(SystemExit) as stop:
        with ConsoleLog(tmp_path / "ftrun.log") as console:
            cli._run_job(cfg, tmp_path, [], False, None, console)
    assert stop.value.code == 1
    err = capfd.readouterr().err
    assert expected in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.strip()]) <= 4, err
    log = (tmp_path / "ftrun.log").read_text()
    assert "Traceback (most recent call last)" in log and expected in log
