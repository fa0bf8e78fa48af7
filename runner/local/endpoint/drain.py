"""Early answers the client can read: a request refused before its body was read (413, 401, ...) has the rest of
its body read and thrown away, up to a bound, before the answer goes out.

Why: a plain client (urllib, requests, httpx, the openai client) sends the whole body before it reads anything. A
server that answers early and closes with body bytes unread makes the kernel reset the connection, and the client
gets "Connection reset by peer" instead of the 413 JSON. Web servers solve it with a "lingering close"; this is the
same idea at the ASGI level: keep reading (and discarding) what the client sends for at most DRAIN_MAX_BYTES and
DRAIN_MAX_S (and no longer than DRAIN_IDLE_S
without a byte), then answer. Whatever is still unread after that makes the answer `Connection: close` (the
CloseUnreadBodies middleware outside this one). Discarded chunks are never kept, so memory stays flat; each chunk is
an await, so other clients are served meanwhile. A client that waits for `100 Continue` has sent nothing: nothing
is drained, it is answered at once.
"""

import asyncio
import logging
import time

from runner.local.endpoint.limits import BodyRead, body_expected

log = logging.getLogger("runner.endpoint")

DRAIN_MAX_BYTES = 64 * 1024 * 1024  # beyond this a client is answered and cut off (a 30 MB body is drained)
DRAIN_MAX_S = 10.0
DRAIN_IDLE_S = 1.0  # a client that stops sending is not waited for (a trickling client is the 408's business)


def _expects_continue(scope) -> bool:
    return any(name == b"expect" and value.strip().lower() == b"100-continue" for name, value in scope["headers"])


class DrainUnreadBodies:
    """ASGI middleware: before a response starts, the unread rest of the request body is read and discarded
    (bounded by DRAIN_MAX_BYTES and DRAIN_MAX_S)."""

    def __init__(self, app, max_bytes: int = DRAIN_MAX_BYTES, max_s: float = DRAIN_MAX_S):
        self.app, self.max_bytes, self.max_s = app, max_bytes, max_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not body_expected(scope) or _expects_continue(scope):
            return await self.app(scope, receive, send)
        body = BodyRead()
        receive_tracked = body.tracking(receive)

        async def drain():
            dropped, started = 0, time.monotonic()

            async def read_rest():
                nonlocal dropped
                while not body.ended and dropped <= self.max_bytes:
                    message = await asyncio.wait_for(receive_tracked(), DRAIN_IDLE_S)
                    dropped += len(message.get("body", b""))

            try:
                await asyncio.wait_for(read_rest(), self.max_s)
            except asyncio.TimeoutError:
                pass
            log.info("%s %s: answered early; %d body bytes read and discarded in %.2fs%s", scope.get("method"),
                     scope.get("path"), dropped, time.monotonic() - started,
                     "" if body.ended else " (bound reached: the connection closes)")

        async def send_after_draining(message):
            # not after a 408: that client was too slow already, and draining it would undo the body timeout
            if message["type"] == "http.response.start" and not body.ended and message.get("status") != 408:
                await drain()
            await send(message)

        await self.app(scope, receive_tracked, send_after_draining)
