"""What a killed run leaves behind: its record says `died` (not `running` forever) once a later run or the cleanup
step looks, and its register staging folder is removed; a live run's record and staging folder are never touched."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.liveness import this_process
from runner.local import registry
from runner.reaper import reap
from runner.record import RunRecord, live_run_entries, load_record
from tests.conftest import REPO


def _killed_process() -> dict:
    """The owner fields of a process that has ended (SIGKILL, reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    owner = {**this_process(), "pid": proc.pid}
    from runner.liveness import _started

    owner["pid_started"] = _started(proc.pid)
    proc.kill()
    proc.wait()
    return owner


KILLED_RUN = r"""
import sys, time
from runner.record import RunRecord
record = RunRecord(sys.argv[1], backend="local", config_sha256="x")
record.track(sys.argv[2])
record.start("data"); record.finish("data", {"rows": 3})
record.start("finetune")
print("ready", flush=True)
time.sleep(120)
"""


def _run_killed_in_finetune(run_dir: Path, root: Path) -> int:
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(run_dir), str(root)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.pid


def test_a_record_left_running_by_a_killed_process_reads_as_died(tmp_path):
    run_dir, root = tmp_path / "run", tmp_path / "state"
    pid = _run_killed_in_finetune(run_dir, root)
    raw = json.loads((run_dir / "run_record.json").read_text())
    assert raw["status"] == "running" and raw["owner"]["pid"] == pid and raw["owner"]["host"]

    record = load_record(run_dir)  # e.g. a later run's from_run=
    assert record["status"] == "died"
    assert record["steps"]["data"]["status"] == "ok" and record["steps"]["finetune"]["status"] == "died"
    assert record["error"]["step"] == "finetune" and f"pid {pid}" in record["error"]["message"]
    assert json.loads((run_dir / "run_record.json").read_text())["status"] == "died"  # written back


def test_the_next_run_finds_killed_runs_in_the_state_root(tmp_path):
    root = tmp_path / "state"
    pid = _run_killed_in_finetune(tmp_path / "killed", root)
    live = RunRecord(tmp_path / "live", backend="local", config_sha256="x")  # this process: alive
    live.track(root)
    live.save()
    said = []

    found = reap(root, say=said.append)
    assert found["died_runs"] == [str((tmp_path / "killed").resolve())]
    assert any(f"pid {pid}" in line and "`died`" in line for line in said)
    assert load_record(tmp_path / "live")["status"] == "running"
    assert [json.loads(p.read_text())["run_dir"] for p in live_run_entries(root)] == [live.data["run_dir"]]
    live.close()
    assert live_run_entries(root) == []  # a run that ends unlists itself


def test_records_that_cannot_be_judged_are_left_alone(tmp_path):
    for name, owner in (("other-host", {**_killed_process(), "host": "another-machine"}), ("old", None)):
        record = RunRecord(tmp_path / name, backend="local", config_sha256="x")
        if owner is None:
            record.data.pop("owner")  # a record written before owners were recorded
        else:
            record.data["owner"] = owner
        record.save()
        assert load_record(tmp_path / name)["status"] == "running"


def test_a_reused_pid_is_not_mistaken_for_the_owner(tmp_path):
    record = RunRecord(tmp_path / "run", backend="local", config_sha256="x")
    record.data["owner"] = {**this_process(), "pid_started": 1}  # same pid, another process's start time
    record.save()
    assert load_record(tmp_path / "run")["status"] == "died"


# ---- register staging folders -------------------------------------------------------------------------------

KILLED_REGISTER = r"""
import os, signal, sys
from pathlib import Path
from runner.local import registry, tracking

uri = sys.argv[1]
run_id = tracking.start_run(tracking_uri=uri, experiment_name="e", artifact_location=sys.argv[2], run_name="r",
                            params={}, tags={})

def save_half_and_die(model_dir, dest, name):  # killed while writing a multi-GB model
    dest.mkdir(parents=True)
    (dest / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
    print(dest.parent, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

registry._save_chat_model = save_half_and_die
registry._log_model(registry.mlflow_client(uri), run_id, "unused", "m")
"""


@pytest.mark.slow  # a register process, killed: ~20 s
def test_a_killed_registers_staging_folder_is_removed_and_a_live_one_kept(tmp_path):
    uri, artifacts = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "mlartifacts"
    proc = subprocess.run([sys.executable, "-c", KILLED_REGISTER, uri, str(artifacts)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    dead = Path(proc.stdout.strip())
    assert dead.is_dir() and dead.name.startswith(".model-") and dead.parent.name == "artifacts"
    # beside it: a live register's (this process), an old-style name and another host's: owners unknown or alive
    live = Path(registry.tempfile.mkdtemp(prefix=registry.staging_prefix(), dir=dead.parent))
    legacy = dead.parent / ".model-k2j3h4"
    other_host = dead.parent / f".model-00000000-{os.getpid()}-1-abc"
    legacy.mkdir()
    other_host.mkdir()

    found = reap(tmp_path / "state", artifacts, say=lambda line: None)
    assert found["removed_staging"] == [str(dead)]
    assert not dead.exists()
    assert live.is_dir() and legacy.is_dir() and other_host.is_dir()


# ---- through ftrun ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ftrun_cleanup_shows_a_killed_run_as_died(tmp_path, ftrun_home):
    env = {**os.environ, "FTRUN_HOME": str(ftrun_home)}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "steps=[model,data,finetune]",
                             "finetune.max_steps=100000", f"hydra.run.dir={killed}"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            path = killed / "run_record.json"
            if path.exists() and "finetune" in json.loads(path.read_text() or "{}").get("steps", {}):
                break
            time.sleep(0.5)
        else:
            pytest.fail("the run never reached its finetune step")
    finally:
        proc.kill()
        proc.wait()
    assert json.loads((killed / "run_record.json").read_text())["status"] == "running"

    cleanup = subprocess.run([sys.executable, "-m", "runner.cli", "steps=[cleanup]", f"hydra.run.dir={tmp_path / 'c'}"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert cleanup.returncode == 0, cleanup.stdout[-3000:] + cleanup.stderr[-3000:]
    assert f"run {killed.resolve()} was left `running` by pid {proc.pid}" in cleanup.stdout
    assert "no endpoint to delete" in cleanup.stdout
    outputs = json.loads((tmp_path / "c" / "run_record.json").read_text())["steps"]["cleanup"]["outputs"]
    assert outputs["died_runs"] == [str(killed.resolve())]
    record = json.loads((killed / "run_record.json").read_text())
    assert record["status"] == "died" and record["steps"]["finetune"]["status"] == "died"
