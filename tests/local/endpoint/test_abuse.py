"""The local endpoint under an oversized request body: refused with 413 by its Content-Length before it is read, or
at the cap while a chunked one streams in, and meanwhile the other clients keep getting their answers."""

import threading
import time

import httpx
import pytest

from runner.local.endpoint.manager import read_key, start_endpoint, stop_endpoint
from runner.local.endpoint.settings import EndpointSettings

pytestmark = pytest.mark.slow

CAP = 1024 * 1024  # deployment.max_request_bytes for this endpoint
BIG = 30 * 1024 * 1024  # the body of the report: 30 MB, authenticated
CHUNK = b"a" * (1024 * 1024)
NORMAL = {"input_data": {"input_string": [{"role": "user", "content": "What is a set?"}],
                         "parameters": {"max_new_tokens": 4}}}


@pytest.fixture(scope="module")
def endpoint(tiny_model_dir, tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("endpoints")
    state = start_endpoint(EndpointSettings(name="abused-endpoint", deployments={"demo": str(tiny_model_dir)},
                                            traffic={"demo": 100}, max_request_bytes=CAP), state_dir=state_dir)
    yield state
    stop_endpoint(state["name"], state_dir=state_dir)


def big_score_body(total: int, sending: threading.Event):
    """A valid /score request of exactly `total` bytes, produced 1 MiB at a time (never held whole)."""
    prefix = b'{"input_data": {"input_string": [{"role": "user", "content": "'
    suffix = b'"}], "parameters": {"max_new_tokens": 2}}}'
    left = total - len(prefix) - len(suffix)
    yield prefix
    while left > 0:  # total / 1 MiB rounds at most
        piece = CHUNK[:left]
        left -= len(piece)
        yield piece
        sending.set()
    yield suffix


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_30mb_body_gets_413_while_other_requests_are_answered(endpoint, framing):
    headers = {"Authorization": f"Bearer {read_key(endpoint)}", "Content-Type": "application/json"}
    big_headers = dict(headers, **({"Content-Length": str(BIG)} if framing == "content-length" else {}))
    sending, outcome = threading.Event(), {}

    def send_big():
        try:
            r = httpx.post(endpoint["scoring_uri"], content=big_score_body(BIG, sending), headers=big_headers,
                           timeout=120)
            outcome["status"], outcome["body"] = r.status_code, r.json()
            outcome["request_headers"] = r.request.headers
        except Exception as exc:  # reported by the assertions below
            outcome["error"] = repr(exc)
        finally:
            sending.set()

    big = threading.Thread(target=send_big, name="big-body")
    big.start()
    assert sending.wait(60), "the big body never started"
    latencies = []
    try:
        # normal requests for as long as the big one lasts (at least one): each is answered, and in under 2 s
        deadline = time.monotonic() + 120
        while len(latencies) < 50 and time.monotonic() < deadline:
            started = time.monotonic()
            try:
                r = httpx.post(endpoint["scoring_uri"], json=NORMAL, headers=headers, timeout=10)
            except httpx.TimeoutException:
                pytest.fail(f"a normal request got no answer within 10 s while the {framing} 30 MB body was "
                            f"sent (answered before: {len(latencies)})")
            latencies.append(time.monotonic() - started)
            assert r.status_code == 200, r.text
            assert latencies[-1] < 2.0, f"a normal request took {latencies[-1]:.1f}s while the big body was sent"
            if not big.is_alive():
                break
    finally:
        big.join(120)
    print(f"{framing}: {len(latencies)} normal requests during the big one, slowest {max(latencies):.2f}s")
    assert not big.is_alive(), "the big request got no answer within 120 s"
    assert "error" not in outcome, outcome.get("error")
    if framing == "chunked":
        assert "content-length" not in outcome["request_headers"]
        assert outcome["request_headers"]["transfer-encoding"] == "chunked"
    assert outcome["status"] == 413, outcome["body"]
    error = outcome["body"]["error"]
    assert error["type"] == "request_too_large" and error["param"] == "body"
    assert str(CAP) in error["message"] and "max_request_bytes" in error["message"]
    # the server is unharmed: a normal request still works
    assert httpx.post(endpoint["scoring_uri"], json=NORMAL, headers=headers, timeout=30).status_code == 200


def test_a_body_within_the_cap_is_still_read_and_served(endpoint):
    headers = {"Authorization": f"Bearer {read_key(endpoint)}"}
    filler = "word " * 20000  # 100 kB: parsed off the event loop, refused as beyond the context, not by size
    body = {"input_data": {"input_string": [{"role": "user", "content": filler}], "parameters": {"max_new_tokens": 2}}}
    r = httpx.post(endpoint["scoring_uri"], json=body, headers=headers, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["type"] == "context_length_exceeded", r.text
    chunked = httpx.post(endpoint["scoring_uri"], content=iter([b'{"input_data": {"input_string": ',
                                                                b'[{"role": "user", "content": "Hi"}], ',
                                                                b'"parameters": {"max_new_tokens": 2}}}']),
                         headers=headers, timeout=60)
    assert chunked.status_code == 200 and isinstance(chunked.json()["output"], str), chunked.text


def test_the_abuse_bench_in_quick_mode_reports_no_good_client_errors(tiny_model_dir):
    """bench/endpoint_abuse.py --quick: every kind of abuser runs, and the good clients get only answers. (Its p99
    ratio is not asserted: timing belongs to the bench, on a quiet machine.)"""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    run = subprocess.run([sys.executable, str(REPO / "bench" / "endpoint_abuse.py"), "--quick", "--seconds", "2",
                          "--model", str(tiny_model_dir)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    out = run.stdout
    assert "PASS  good-client errors: 0 (target 0)" in out, out + run.stderr
    assert "PASS  abusive requests answered 5xx: 0" in out, out
    for kind in ("nan-temperature", "nested-json", "empty-message-flood", "long-stop-strings", "abandoned"):
        line = next(l for l in out.splitlines() if l.strip().startswith(kind))
        assert "{}" not in line, f"the {kind} abuser sent nothing: {line}"
    assert "'400'" in next(l for l in out.splitlines() if l.strip().startswith("nan-temperature"))
    assert "'413'" in next(l for l in out.splitlines() if l.strip().startswith("empty-message-flood"))


def _urllib_post(url, body: bytes, headers):
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _httpx_post(url, body: bytes, headers):
    r = httpx.post(url, content=body, headers=headers, timeout=30)
    return r.status_code, r.json()


@pytest.mark.parametrize("client", [_urllib_post, _httpx_post], ids=["urllib", "httpx"])
def test_a_30mb_body_sent_in_one_go_gets_the_413_json_not_a_reset(endpoint, client):
    """A plain client writes the whole body before reading: the server reads and discards the rest (bounded), so
    the 413 reaches it instead of "Connection reset by peer"; a concurrent normal request is unharmed."""
    headers = {"Authorization": f"Bearer {read_key(endpoint)}", "Content-Type": "application/json"}
    body = b'{"input_data": {"input_string": [{"role": "user", "content": "' + b"a" * BIG + b'"}]}}'
    outcome, normal = {}, {}

    def send_big():
        started = time.monotonic()
        try:
            outcome["status"], outcome["body"] = client(endpoint["scoring_uri"], body, headers)
        except Exception as exc:  # a reset: what the report saw
            outcome["error"] = repr(exc)
        outcome["seconds"] = time.monotonic() - started

    big = threading.Thread(target=send_big)
    big.start()
    time.sleep(0.05)
    started = time.monotonic()
    r = httpx.post(endpoint["scoring_uri"], json=NORMAL, headers=headers, timeout=10)
    normal["status"], normal["seconds"] = r.status_code, time.monotonic() - started
    big.join(60)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["status"] == 413 and outcome["seconds"] < 5, outcome
    assert outcome["body"]["error"]["type"] == "request_too_large" and str(CAP) in outcome["body"]["error"]["message"]
    assert normal["status"] == 200 and normal["seconds"] < 2, normal
