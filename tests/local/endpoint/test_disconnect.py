"""A client that disconnects mid-body costs one short log line, and the server log is bounded (server_log.py)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runner.local.endpoint.manager import read_key, start_endpoint, stop_endpoint
from runner.local.endpoint.settings import EndpointSettings
from tests.conftest import REPO


@pytest.mark.slow
def test_a_mid_body_disconnect_is_one_short_log_line(tiny_model_dir, tmp_path):
    import httpx

    state = start_endpoint(EndpointSettings(name="hang-ups", deployments={"demo": str(tiny_model_dir)},
                                            traffic={"demo": 100}), state_dir=tmp_path / "endpoints")
    log = Path(state["log_file"])
    try:
        host, port = state["url"].split("//")[1].rsplit(":", 1)
        before = log.read_text()
        for _ in range(20):
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {read_key(state)}\r\n"
                             "Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n".encode()
                             + b'{"input_data": {"input_string": [')
                time.sleep(0.05)
        time.sleep(1.0)
        ok = httpx.post(state["scoring_uri"], headers={"Authorization": f"Bearer {read_key(state)}"}, timeout=30,
                        json={"input_data": {"input_string": [{"role": "user", "content": "hi"}],
                                             "parameters": {"max_new_tokens": 2}}})
        added = log.read_text()[len(before):]
    finally:
        stop_endpoint(state["name"], state_dir=tmp_path / "endpoints")
    assert ok.status_code == 200
    lines = [line for line in added.splitlines() if "disconnected" in line]
    assert len(lines) == 20, added
    assert "Traceback" not in added and "ERROR" not in added, added
    assert all(len(line) < 200 for line in lines), lines


def test_the_server_log_is_rotated_past_its_cap(tmp_path):
    log = tmp_path / "endpoint.log"
    code = ("import logging; from runner.local.endpoint.server_log import RotatingStderrHandler\n"
            "logging.basicConfig(level='INFO', handlers=[RotatingStderrHandler(max_bytes=4000)])\n"
            "for i in range(500): logging.getLogger('x').info('line %d %s', i, 'y' * 80)\n")
    with open(log, "ab") as err:
        subprocess.run([sys.executable, "-c", code], stderr=err, check=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert log.stat().st_size <= 4200 and Path(str(log) + ".1").stat().st_size <= 4200
    assert "line 499" in log.read_text()  # the newest lines are kept
