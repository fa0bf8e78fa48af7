"""Limits and auth: the endpoint key, the caps on a request (body bytes, messages, prompt characters and tokens,
stop strings) and on a connection (headers and body in time), each refused before the work it would cause."""

import asyncio
import hmac
import logging
from dataclasses import dataclass
from typing import Optional

from fastapi import Request

from runner.local.endpoint.api_errors import ApiError

log = logging.getLogger("runner.endpoint")

MAX_REQUEST_BYTES = 4 * 1024 * 1024  # deployment.max_request_bytes: a few MB is far beyond any model's context


@dataclass(frozen=True)
class RequestLimits:
    """Per-request limits checked before tokenizing (deployment.max_messages, ...). Each bounds work a request can
    cause before the context check: 140,000 empty messages are 3.9 MB of JSON but 560k tokens to template."""

    max_messages: int = 256
    max_prompt_chars: int = 200_000  # message contents, summed
    max_prompt_tokens: int = 0  # after tokenizing; 0 = the model's context
    max_stop_strings: int = 4
    max_stop_chars: int = 256  # per stop string: every new token is matched against each one

    def __post_init__(self):
        for name in ("max_messages", "max_prompt_chars", "max_stop_strings", "max_stop_chars"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) \
                    or getattr(self, name) < 1:
                raise ValueError(f"deployment.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if isinstance(self.max_prompt_tokens, bool) or not isinstance(self.max_prompt_tokens, int) \
                or self.max_prompt_tokens < 0:
            raise ValueError(f"deployment.max_prompt_tokens must be an integer >= 0, got {self.max_prompt_tokens!r}")


DEFAULT_LIMITS = RequestLimits()


def check_key(request: Request, key: str) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    supplied = token.strip() if scheme.lower() == "bearer" else ""
    # constant-time comparison; the supplied token is never echoed or logged
    if not supplied or not hmac.compare_digest(supplied.encode(), key.encode()):
        raise ApiError(401, "missing or wrong key: send 'Authorization: Bearer <endpoint key>'",
                       param="Authorization", kind="authentication_error")


def has_key(request: Request, key: str) -> bool:
    try:
        check_key(request, key)
        return True
    except ApiError:
        return False


def too_large(limit: int, what: str) -> ApiError:
    return ApiError(413, f"the request body is {what}; this endpoint accepts at most {limit} bytes "
                         f"(deployment.max_request_bytes)", param="body", kind="request_too_large")


async def read_body(request: Request, limit: int, timeout_s: Optional[float] = None) -> bytes:
    """The body, refused (413) by its Content-Length before any of it is read, or once more than `limit` bytes
    arrived when it has none (chunked): what is beyond the cap is never read or held. A body that has not arrived
    within `timeout_s` is a 408 (a client trickling bytes would otherwise hold its connection for ever)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.strip().isascii() and declared.strip().isdigit()):
            raise ApiError(400, f"Content-Length must be a number of bytes, got {declared!r}", param="Content-Length")
        if int(declared) > limit:
            raise too_large(limit, f"{int(declared)} bytes (Content-Length)")
    body = bytearray()

    async def read():
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise too_large(limit, f"more than {limit} bytes")

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s (deployment.body_timeout_s); "
                            f"{len(body)} bytes came", param="body", kind="timeout_error") from None
    return bytes(body)


def body_expected(scope) -> bool:
    """Whether the request has a body to read (a chunked one, or a Content-Length above 0)."""
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False


@dataclass
class BodyRead:
    """Whether a request's body has been read to its end (or the client went away), as the ASGI messages say."""

    ended: bool = False

    def tracking(self, receive):
        """`receive`, noting here when the body's last part (or a disconnect) has been received."""
        async def receive_tracked():
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                self.ended = True
            return message

        return receive_tracked


class CloseUnreadBodies:
    """ASGI middleware: a response that starts before the request body was read to its end (401, 413, ...) says
    `Connection: close`. Otherwise uvicorn would go on reading, and discarding, whatever the client still sends."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body = BodyRead(ended=not body_expected(scope))
        receive_tracked = body.tracking(receive)

        async def send_closing(message):
            if message["type"] == "http.response.start" and not body.ended:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": headers + [(b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_tracked, send_closing)


def slow_client_protocol(header_timeout_s: float):
    """uvicorn's h11 protocol, closing a connection whose request line and headers have not all arrived within
    `header_timeout_s` of its opening (or of its previous response): uvicorn has no such timeout, and its keep-alive
    timer stops at the first byte, so a client sending a header byte now and then held a connection for ever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class SlowClientTimeoutProtocol(H11Protocol):
        header_timer = None

        def _arm_header_timer(self):
            self._disarm_header_timer()
            self.header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _disarm_header_timer(self):
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _header_timeout(self):
            self.header_timer = None
            # IDLE: no complete request head since the timer was armed (a request in progress is SEND_BODY/DONE)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("closing a connection from %s: no request headers within %gs", self.client, header_timeout_s)
                self.transport.close()

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data):
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm_header_timer()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm_header_timer()

        def connection_lost(self, exc):
            self._disarm_header_timer()
            super().connection_lost(exc)

    return SlowClientTimeoutProtocol
