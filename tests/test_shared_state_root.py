"""Runs that share one state root: the MLflow store set up once, a training folder per live run, checkpoints
checked by their checksums before a resume."""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from runner import locks
from runner.local import checkpoints, training_dir
from tests.conftest import REPO

STORE_RACE = textwrap.dedent("""
    import sys, time
    from runner.local import registry, tracking
    root, go = sys.argv[1], float(sys.argv[2])
    uri = f"sqlite:///{root}/mlflow.db"
    while time.time() < go:  # every process reaches the fresh store at the same moment
        time.sleep(0.001)
    run_id = tracking.start_run(tracking_uri=uri, experiment_name="shared", artifact_location=f"{root}/artifacts",
                                run_name="r", params={"a": 1}, tags={"t": "x"})
    print("RUN", run_id, flush=True)
""")

HOLDER = textwrap.dedent("""
    import sys, time
    from runner import locks
    locks.hold(sys.argv[1])
    print("HELD", flush=True)
    time.sleep(60)
""")


def _python(code, *args, **kwargs):
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                            **kwargs)


@pytest.mark.slow  # three ftrun-like processes, each importing mlflow: ~35 s on 2 busy cores
def test_three_processes_set_up_a_fresh_store_at_once(tmp_path):
    go = time.time() + 8  # after the imports of all three
    procs = [_python(STORE_RACE, tmp_path, go) for _ in range(3)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n\n".join(o[-2500:] for o in outputs)
    run_ids = {line.split()[1] for o in outputs for line in o.splitlines() if line.startswith("RUN ")}
    assert len(run_ids) == 3
    assert (tmp_path / "mlflow.db.lock").exists()  # the lock lives beside the store, in the state root


def test_a_lock_held_by_another_process_is_seen_and_freed_when_it_dies(tmp_path):
    path = tmp_path / "x.lock"
    holder = _python(HOLDER, path)
    try:
        assert holder.stdout.readline().strip() == "HELD"
        assert locks.is_locked_elsewhere(path)
        with pytest.raises(locks.LockBusy):
            locks.hold(path)
        with pytest.raises(locks.LockBusy):
            with locks.exclusive(path, timeout=0.2):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert not locks.is_locked_elsewhere(path)  # SIGKILL: the kernel let go of it
    with locks.exclusive(path, wait=False):
        pass


def _finished_folder(key_dir, name, steps=(2,)):
    folder = key_dir / name
    for step in steps:
        ckpt = folder / "checkpoints" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "model.safetensors").write_bytes(b"w" * 16)
        checkpoints.mark_complete(ckpt, step)
    return folder


def test_each_run_gets_its_own_training_folder_and_a_live_one_is_never_taken(tmp_path):
    key_dir = tmp_path / "training" / "abc"
    live = _finished_folder(key_dir, "20260101T000000-1-aaaaaa")
    holder = _python(HOLDER, training_dir.lock_file(live))
    try:
        assert holder.stdout.readline().strip() == "HELD"
        first = training_dir.claim(key_dir, resume=False)
        # a resume does not take over a folder another live run writes into: it gets one of its own
        second = training_dir.claim(key_dir, resume=True)
        assert len({live, first["out_dir"], second["out_dir"]}) == 3
        assert not second["resumed_folder"]
        assert live.is_dir() and (live / "checkpoints" / "checkpoint-2").is_dir()  # nothing of it removed
        with pytest.raises(Exception, match="in use by another live training run"):
            training_dir.hold_for_training(live)
    finally:
        holder.kill()
        holder.wait()
        for folder in (first["out_dir"], second["out_dir"]):
            training_dir.release(folder)


def test_resume_takes_over_the_newest_dead_folder_with_a_checkpoint_and_clears_stale_ones(tmp_path):
    key_dir = tmp_path / "training" / "abc"
    older = _finished_folder(key_dir, "20260101T000000-1-aaaaaa")
    newer = _finished_folder(key_dir, "20260102T000000-2-bbbbbb", steps=(2, 4))
    empty = key_dir / "20260103T000000-3-cccccc"  # killed before its first checkpoint
    empty.mkdir()
    foreign = _finished_folder(key_dir, "checkpoints-of-an-older-layout")  # not a run folder: left alone
    claimed = training_dir.claim(key_dir, resume=True)
    try:
        assert claimed["out_dir"] == newer and claimed["resumed_folder"]
        assert training_dir.is_live(newer)
        assert sorted(claimed["removed"]) == sorted([older.name, empty.name])
        assert training_dir.run_folders(key_dir) == [newer] and foreign.is_dir()
    finally:
        training_dir.release(newer)
    fresh = training_dir.claim(key_dir, resume=False)  # a fresh start supersedes the finished folder
    try:
        assert fresh["out_dir"] != newer and not fresh["resumed_folder"]
        assert training_dir.run_folders(key_dir) == [fresh["out_dir"]]
    finally:
        training_dir.release(fresh["out_dir"])


def test_a_checkpoint_corrupted_at_the_same_size_is_skipped_for_the_previous_one(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        folder = root / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(bytes(range(256)) * 4)
        (folder / "trainer_state.json").write_text('{"global_step": %d}' % step)
        checkpoints.mark_complete(folder, step)
    newest = root / "checkpoint-4" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[100] ^= 0xFF  # one byte flipped, same size
    newest.write_bytes(bytes(data))
    assert checkpoints.is_complete(root / "checkpoint-4")  # the sizes alone cannot tell
    assert checkpoints.corrupt_file(root / "checkpoint-4") == "model.safetensors"
    latest, warnings = checkpoints.latest_intact(root)
    assert latest == root / "checkpoint-2"
    assert len(warnings) == 1 and "checkpoint-4" in warnings[0] and "model.safetensors" in warnings[0]
    assert [p.name for p in checkpoints.list_checkpoints(root)] == ["checkpoint-2"]


def test_a_manifest_from_before_checksums_still_counts(tmp_path):
    folder = tmp_path / "checkpoint-1"
    folder.mkdir()
    (folder / "w").write_bytes(b"abc")
    (folder / checkpoints.MARKER).write_text('{"global_step": 1, "files": {"w": 3}}')
    assert checkpoints.is_complete(folder) and checkpoints.corrupt_file(folder) is None
    assert checkpoints.latest_intact(tmp_path) == (folder, [])


def test_default_endpoint_names_are_unique_within_one_second_and_valid():
    from runner.local.endpoint.manager import NAME_RULE, unique_name

    names = {unique_name("ultrachat-completion-") for _ in range(200)}
    assert len(names) > 190  # 4 random hex digits: a clash in 200 draws is rare, 10 would be absurd
    assert all(NAME_RULE.match(n) and len(n) <= 32 for n in names)


@pytest.mark.slow
def test_cleanup_never_stops_a_server_whose_token_is_not_its_own(tiny_model_dir, tmp_path):
    import json

    from runner.atomic import write_text
    from runner.local.endpoint import manager

    # a server that binds at once and never needs to finish loading for this test
    from runner.local.endpoint.settings import EndpointSettings

    a = manager.launch_server(EndpointSettings(name="shared-name", deployments={"demo": str(tiny_model_dir)},
                                               traffic={"demo": 100}, host="127.0.0.1", port=0,
                                               request_timeout_ms=1000, max_batch_size=1, batch_window_ms=1,
                                               load_delay_s=120), state_dir=tmp_path)
    state_file = tmp_path / "shared-name.json"
    try:
        write_text(state_file, json.dumps(a))
        assert manager.find_endpoint("shared-name", state_dir=tmp_path)["alive"] is True
        # what another process sees: the token in the server's environment, as the kernel keeps it
        assert manager._carries(a["pid"], a["instance"]) and not manager._carries(a["pid"], "0" * 32)
        # another run's cleanup holding a state for the same name but another server's token: A is untouched
        other = {**a, "instance": "0" * 32}
        out = manager.stop_endpoint(other, state_dir=tmp_path)
        assert "belong to another server" in out["note"]
        assert manager._is_our_server(a["pid"], "shared-name", a["instance"])
        assert state_file.exists() and (tmp_path / "shared-name.key").exists()
        # a state file whose token the live pid does not carry (a recycled pid, a server that took the name over):
        # not adopted as alive, and a stop by name does not signal that pid
        write_text(state_file, json.dumps(other))
        assert manager.find_endpoint("shared-name", state_dir=tmp_path)["alive"] is False
        assert manager.stop_endpoint("shared-name", state_dir=tmp_path)["how"] == "not running"
        assert manager._is_our_server(a["pid"], "shared-name", a["instance"])
    finally:
        write_text(state_file, json.dumps(a))
        assert manager.stop_endpoint(a, state_dir=tmp_path)["how"] in ("terminated", "killed")
    assert not manager._is_our_server(a["pid"], "shared-name")


@pytest.mark.slow  # two ftrun processes: ~35 s on 2 busy cores
def test_runs_started_in_the_same_second_get_their_own_run_dirs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "FTRUN_HOME": str(tmp_path / "home")}
    procs = [subprocess.Popen([sys.executable, "-m", "runner.cli", "steps=[connect]"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n\n".join(o[-2000:] for o in outputs)
    run_dirs = sorted(p.parent for p in (tmp_path / "outputs").glob("*/*/run_record.json"))
    assert len(run_dirs) == 3
    pids = {str(p.pid) for p in procs}
    assert {d.name.rsplit("-", 1)[1] for d in run_dirs} == pids  # <time>-<pid>
    for run_dir in run_dirs:  # each log holds one run only
        assert (run_dir / "ftrun.log").read_text().count("state folder") == 1


def test_the_test_step_never_sends_the_key_to_a_server_its_state_file_does_not_name(tmp_path):
    import json
    from types import SimpleNamespace

    from runner.local.backend import LocalBackend
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["endpoint_name=stale-one"])
    endpoints = tmp_path / "ftrun_home" / "endpoints"
    endpoints.mkdir(parents=True)
    # alive pid (this test process), but not a server carrying the recorded token
    (endpoints / "stale-one.json").write_text(json.dumps({
        "name": "stale-one", "pid": os.getpid(), "instance": "0" * 32, "url": "http://127.0.0.1:9",
        "scoring_uri": "http://127.0.0.1:9/score", "port": 9, "host": "127.0.0.1",
        "key_file": str(endpoints / "stale-one.key")}))
    (endpoints / "stale-one.key").write_text("secret")
    ctx = SimpleNamespace(endpoint=None, record=SimpleNamespace(output=lambda *a: None))
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"input_data": {"input_string": [[{"role": "user", "content": "hi"}]]}}))
    with pytest.raises(RuntimeError, match="is not running any more"):
        LocalBackend(cfg).test(ctx, request)
