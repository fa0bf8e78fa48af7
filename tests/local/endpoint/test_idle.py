"""Idle connections cannot deny service: 300 connections that send half a header and then nothing (reopened when
the server closes them) while a keyed client sends a request every 0.5 s (runner/local/endpoint/admission.py)."""

import importlib.util

import pytest

from runner.local.endpoint.manager import read_key, start_endpoint, stop_endpoint
from runner.local.endpoint.settings import EndpointSettings
from tests.conftest import REPO


def _bench():
    spec = importlib.util.spec_from_file_location("endpoint_abuse", REPO / "bench" / "endpoint_abuse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_300_half_header_connections_do_not_crowd_out_a_keyed_client(tiny_model_dir, tmp_path):
    state = start_endpoint(EndpointSettings(name="idle-sockets", deployments={"demo": str(tiny_model_dir)},
                                            traffic={"demo": 100}), state_dir=tmp_path / "endpoints")
    try:
        bench = _bench()
        headers = {"Authorization": f"Bearer {read_key(state)}"}
        bench.keyed_requests(state["url"], headers, 1.0)  # warm-up
        # 12 s: past the 10 s header deadline, so the held connections are also closed and reopened meanwhile
        result = bench.idle_connections_case(state["url"], headers, connections=300, seconds=12.0)
    finally:
        stop_endpoint(state["name"], state_dir=tmp_path / "endpoints")
    held = result["held"]["statuses"]
    assert result["connections"].get("opened", 0) >= 300 and "could not connect" not in result["connections"]
    assert set(held) == {"200"} and held["200"] >= 21, result  # every keyed request answered, ~24 of them
    assert result["baseline"]["statuses"] == {"200": result["baseline"]["statuses"].get("200")}
    # Crowded out, a keyed request waits for an idle connection's 10 s header deadline (or is refused); served, it
    # takes tens of milliseconds. The test asserts that difference; the <= 2x p99 target is bench/endpoint_abuse.py's
    # (a ratio of two p99s of 40 samples on a busy CI machine swings past 2x with one slow request: seen 2.09x).
    slowest = max(result["held"]["latencies"])
    assert slowest < 1.0, f"slowest keyed request {slowest:.3f}s while held (p99 alone {result['p99_baseline_s']:.3f}s)"
