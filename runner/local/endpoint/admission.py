"""Admission: which connections and requests the endpoint takes on, so that idle sockets cannot deny service.

uvicorn's `limit_concurrency` counts every open connection, including ones that never finished a request header:
about 256 connections sending half a header (no key needed) made every new client get 503 until the header timeout,
and reopening them as they closed kept it so (measured: 1 of 44 keyed requests got 200; README, "Idle connections").
So the endpoint runs uvicorn without `limit_concurrency` and splits the two budgets:

- `AdmissionLimit` (ASGI): only admitted work counts against `deployment.max_connections`: requests whose headers
  are complete and that carry the endpoint key. Beyond it, a keyed request gets 503 with Retry-After. A request
  without the key is not counted (it is answered 401 at once and does no work).
- `admission_protocol` (the h11 protocol): connections that have not sent a complete request head yet have their
  own budget (`pending_budget`, 4 x max_connections) on top of the header deadline (deployment.header_timeout_s).
  When a new connection would exceed it, the oldest connection still waiting for its first request head is
  closed (then the oldest idle keep-alive one): a client that sends its request at once is never the oldest, so
  a flood of idle sockets only evicts itself.
"""

import collections
import hmac
import json

PENDING_PER_ADMITTED = 4


def _bearer(scope) -> bytes:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else b""
    return b""


class AdmissionLimit:
    """ASGI middleware: at most `limit` keyed requests in flight; more get 503 (they are not queued unboundedly)."""

    def __init__(self, app, limit: int, key: str):
        self.app, self.limit, self.key = app, int(limit), key.encode()
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        token = _bearer(scope) if scope["type"] == "http" else b""
        if not token or not hmac.compare_digest(token, self.key):
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            body = json.dumps({"error": {"message": f"the endpoint is at its limit of {self.limit} requests in "
                                                    "flight (deployment.max_connections); retry shortly",
                                         "type": "server_busy", "param": None, "code": 503}}).encode()
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def admission_protocol(base, pending_budget: int):
    """`base` (an H11Protocol class) with a bounded set of connections waiting for a request head."""
    import h11

    waiting = collections.OrderedDict()  # protocol -> served before (keep-alive idle) or not; shared by the server

    class AdmissionProtocol(base):
        served = False

        def _wait(self):
            if self.transport.is_closing():
                return
            waiting[self] = self.served
            waiting.move_to_end(self)
            if len(waiting) > pending_budget:
                victim = next((p for p, served in waiting.items() if not served and p is not self), None)
                victim = victim or next(p for p in waiting if p is not self)
                waiting.pop(victim, None)
                victim.transport.close()

        def connection_made(self, transport):
            super().connection_made(transport)
            self._wait()

        def data_received(self, data):
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                waiting.pop(self, None)

        def on_response_complete(self):
            super().on_response_complete()
            self.served = True
            if self.conn.their_state is h11.IDLE:
                self._wait()

        def connection_lost(self, exc):
            waiting.pop(self, None)
            super().connection_lost(exc)

    AdmissionProtocol.waiting = waiting
    return AdmissionProtocol
