"""The admission layer in front of the endpoint app (runner/local/endpoint/admission.py), on a real uvicorn server
with a trivial app: the half-header budget evicts the oldest waiting connection, and only keyed requests count
against the limit of requests in flight."""

import asyncio
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from runner.local.endpoint.admission import AdmissionLimit, admission_protocol
from runner.local.endpoint.limits import slow_client_protocol

KEY = "k" * 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    release = threading.Event()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        while scope["path"] == "/hold" and not release.is_set():
            await asyncio.sleep(0.02)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    protocol = admission_protocol(slow_client_protocol(30.0), pending_budget=5)
    port = _free_port()
    config = uvicorn.Config(AdmissionLimit(app, limit=2, key=KEY), host="127.0.0.1", port=port, http=protocol,
                            log_level="warning", lifespan="off", limit_concurrency=None)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "protocol": protocol, "release": release}
    release.set()
    srv.should_exit = True
    thread.join(10)


def _closed(sock, wait: float = 2.0) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def test_the_oldest_half_header_connections_are_evicted_past_the_budget(server):
    socks = []
    for _ in range(8):
        s = socket.create_connection(("127.0.0.1", server["port"]))
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # half a header, then nothing
        socks.append(s)
        time.sleep(0.05)
    r = httpx.get(server["url"] + "/", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
    assert r.status_code == 200  # a new client that sends its request at once is served
    closed = [_closed(s, 1.0) for s in socks]
    assert closed[:4] == [True] * 4 and closed[-3:] == [False] * 3, closed  # the oldest went first
    assert len(server["protocol"].waiting) <= 5
    for s in socks:
        s.close()


def test_only_keyed_requests_count_against_the_limit(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=10) as a, httpx.Client(timeout=10) as b, httpx.Client(timeout=10) as c:
        results = {}
        holders = [threading.Thread(target=lambda k=k, cl=cl: results.__setitem__(k, cl.get(
            server["url"] + "/hold", headers=headers).status_code)) for k, cl in (("a", a), ("b", b))]
        for t in holders:
            t.start()
        time.sleep(0.5)  # two keyed requests in flight: the limit
        third = c.get(server["url"] + "/", headers=headers)
        assert third.status_code == 503 and third.headers["retry-after"] == "1"
        unkeyed = httpx.get(server["url"] + "/", timeout=5)
        assert unkeyed.status_code == 200  # not counted (the real app answers it 401 at once)
        server["release"].set()
        for t in holders:
            t.join(10)
        assert results == {"a": 200, "b": 200}
