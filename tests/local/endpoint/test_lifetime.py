"""An endpoint's lifetime is its ftrun's: with deployment.keep_alive=true a real `ftrun` deletes it on SIGTERM and
SIGHUP as on Ctrl-C (SIGINT too when ftrun was started with it ignored, as a background job is), and when ftrun is killed outright the server ends by itself and removes its files."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runner.local.endpoint import manager
from tests.conftest import REPO

pytestmark = pytest.mark.slow

SERVING = "Ctrl-C to delete it"


def earlier_run(tmp_path: Path, model_dir) -> Path:
    """A run record whose register step names the tiny model, for `from_run=`: deploy serves it at once."""
    run_dir = tmp_path / "registered"
    run_dir.mkdir()
    (run_dir / "run_record.json").write_text(json.dumps({
        "run_dir": str(run_dir), "status": "ok",
        "steps": {"register": {"status": "ok", "outputs": {"model_uri": str(model_dir)}}}}))
    return run_dir


class Ftrun:
    """`ftrun steps=[deploy,cleanup] deployment.keep_alive=true` as its own process, its output read by a thread."""

    def __init__(self, tmp_path: Path, home: Path, model_dir, *overrides, sigint_ignored: bool = False):
        self.run_dir = tmp_path / "run"
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.output = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runner.cli", "steps=[deploy,cleanup]", "deployment.keep_alive=true",
             f"from_run={earlier_run(tmp_path, model_dir)}", f"hydra.run.dir={self.run_dir}", *overrides],
            cwd=REPO, env={**os.environ, "FTRUN_HOME": str(home)}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
            # as a background job of a script starts it (`ftrun ... &`, nohup): SIGINT ignored
            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.output.append(line)
            if text in line:
                return
        pytest.fail(f"ftrun never printed {text!r}; its output:\n{''.join(self.output)[-4000:]}")

    def finish(self, timeout: float) -> str:
        self.proc.wait(timeout)
        time.sleep(0.2)  # the reader thread drains what is left
        while not self.lines.empty():
            self.output.append(self.lines.get())
        return "".join(self.output)

    def record(self):
        return json.loads((self.run_dir / "run_record.json").read_text())

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def serving_endpoint(home: Path):
    [state_file] = [p for p in (home / "endpoints").glob("*.json") if not p.name.endswith(manager.SETTINGS_SUFFIX)]
    state = json.loads(state_file.read_text())
    assert manager._listening("127.0.0.1", state["port"])
    assert Path(state["key_file"]).exists()
    return state, state_file


def gone(state, state_file) -> None:
    """Nothing of the endpoint is left: no process, nothing on its port, no key, no state or settings file."""
    assert not manager._is_our_server(state["pid"], state["name"]), f"the server (pid {state['pid']}) still runs"
    assert not manager._listening("127.0.0.1", state["port"]), f"port {state['port']} still accepts connections"
    assert not Path(state["key_file"]).exists(), "the key file is left behind"
    assert not state_file.exists(), "the state file is left behind"
    assert not (state_file.parent / f"{state['name']}{manager.SETTINGS_SUFFIX}").exists(), "the settings file is left"


@pytest.mark.parametrize("sig, sigint_ignored", [(signal.SIGTERM, False), (signal.SIGHUP, False),
                                                 (signal.SIGINT, True)],
                         ids=["SIGTERM", "SIGHUP", "SIGINT-to-a-background-ftrun"])
def test_sigterm_or_sighup_deletes_a_kept_alive_endpoint_like_ctrl_c(tmp_path, ftrun_home, tiny_model_dir, sig,
                                                                    sigint_ignored):
    ftrun = Ftrun(tmp_path, ftrun_home, tiny_model_dir, sigint_ignored=sigint_ignored)
    state = state_file = None
    try:
        ftrun.wait_for(SERVING, timeout=300)
        state, state_file = serving_endpoint(ftrun_home)
        ftrun.proc.send_signal(sig)
        output = ftrun.finish(timeout=90)
        gone(state, state_file)
    finally:
        ftrun.kill()
        if state is not None:  # whatever happened above, leave nothing running
            manager.stop_endpoint(state["name"], state_dir=ftrun_home / "endpoints")
    assert f"{sig.name}: deleting endpoint" in output
    assert ftrun.proc.returncode == 0, output[-3000:]
    record = ftrun.record()
    assert record["status"] == "ok"  # as after Ctrl-C: ending the wait is how a kept-alive endpoint is deleted
    cleanup = record["steps"]["cleanup"]
    assert cleanup["status"] == "ok" and cleanup["outputs"]["deleted"] is True
    assert cleanup["outputs"]["ended_by"] == sig.name


def test_the_server_ends_by_itself_when_its_ftrun_is_killed(tmp_path, ftrun_home, tiny_model_dir):
    ftrun = Ftrun(tmp_path, ftrun_home, tiny_model_dir)
    state = state_file = None
    try:
        ftrun.wait_for(SERVING, timeout=300)
        state, state_file = serving_endpoint(ftrun_home)
        ftrun.proc.send_signal(signal.SIGKILL)  # no handler runs: only the server itself can notice
        ftrun.finish(timeout=30)
        for _ in range(200):  # 20 s at most
            if not manager._is_our_server(state["pid"], state["name"]) and not state_file.exists():
                break
            time.sleep(0.1)
        gone(state, state_file)
    finally:
        ftrun.kill()
        if state is not None:
            manager.stop_endpoint(state["name"], state_dir=ftrun_home / "endpoints")
    log = Path(state["log_file"]).read_text()
    assert f"owner process {ftrun.proc.pid} is gone" in log
    assert ftrun.record()["steps"]["cleanup"]["status"] == "running"  # ftrun itself had no chance to record anything
