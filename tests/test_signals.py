"""Stop signals reach the runner however it was started: with SIGINT ignored by its parent (a background job of a
non-interactive shell, `nohup`), a kept-alive endpoint still goes on Ctrl-C / `kill -INT`, SIGTERM and SIGHUP."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from runner.local.endpoint import manager
from runner.signals import stop_raises_interrupt


def _ignore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_inherited_ignore_is_overridden_and_restored():
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a background job of a script inherits
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGINT"):
            with stop_raises_interrupt():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler runs at the next bytecode; never reached
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # restored as it was
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_repeated_signal_does_not_cut_the_cleanup_short(capfd):
    term_before = signal.getsignal(signal.SIGTERM)
    cleaned = False
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        with stop_raises_interrupt(who="test"):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            finally:
                os.kill(os.getpid(), signal.SIGHUP)  # during the cleanup: only noted
                time.sleep(0.05)
                cleaned = True
    assert cleaned
    assert "test: SIGHUP again: still cleaning up" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is term_before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_kept_alive_endpoint_is_deleted_on_each_stop_signal_with_sigint_ignored(tmp_path, sig):
    # a stand-in server process: its command line is what the manager recognises as the endpoint's server
    name = "fake-endpoint"
    server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", manager.SERVER_MODULE,
                               "--settings", str(tmp_path / f"{name}{manager.SETTINGS_SUFFIX}")])
    port = _free_port()
    key = tmp_path / f"{name}.key"
    key.write_text("k")
    state = {"name": name, "pid": server.pid, "url": f"http://127.0.0.1:{port}", "host": "127.0.0.1",
             "port": port, "key_file": str(key)}
    (tmp_path / f"{name}.json").write_text(json.dumps(state))
    try:
        keeper = subprocess.Popen(
            [sys.executable, "-c", "import json, sys; from runner.local.endpoint.manager import serve_until_interrupted;"
             " print(json.dumps(serve_until_interrupted(json.loads(sys.argv[1]), poll_s=0.1)))", json.dumps(state)],
            stdout=subprocess.PIPE, text=True, bufsize=1, preexec_fn=_ignore_sigint,
            env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert "Ctrl-C to delete" in keeper.stdout.readline()
        keeper.send_signal(sig)
        out = json.loads(keeper.communicate(timeout=30)[0].strip().splitlines()[-1])
        assert keeper.returncode == 0
        assert out["deleted"] is True and out["ended_by"] == sig.name and out["how"] == "terminated"
        assert server.wait(timeout=10) is not None
        assert not key.exists() and not (tmp_path / f"{name}.json").exists()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.mark.slow
def test_the_endpoint_server_drains_and_ends_on_sighup(tiny_model_dir, tmp_path):
    from runner.local.endpoint.manager import launch_server, stop_endpoint, wait_ready

    from runner.local.endpoint.settings import EndpointSettings

    state = launch_server(EndpointSettings(name="hangup-ep", deployments={"demo": str(tiny_model_dir)},
                                           traffic={"demo": 100}, host="127.0.0.1", port=0, request_timeout_ms=30000,
                                           max_batch_size=2, batch_window_ms=5), state_dir=tmp_path)
    try:
        wait_ready(state, timeout_s=120, progress=False)
        os.kill(state["pid"], signal.SIGHUP)  # its default action would kill it without draining
        assert manager._wait_exit(state["pid"], "hangup-ep", 20, state["instance"])
        log = (tmp_path / "hangup-ep.log").read_text()
        assert "signal 1: draining" in log and "endpoint hangup-ep stopped" in log
        assert not manager._listening("127.0.0.1", state["port"])
    finally:
        stop_endpoint(state, state_dir=tmp_path)
