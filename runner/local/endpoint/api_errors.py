"""The endpoint's one error model: an ApiError is an HTTP status and a JSON body
`{"error": {"message", "type", "param", "code"}}`, whatever raised it (parsing, limits, auth, generation)."""

import json
from typing import Optional

from fastapi.responses import Response

from runner.local.endpoint.generation import GenerationResult


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}
        # ASCII-escaped: a message that quotes the client's text (a lone surrogate even) can always be sent
        return Response(json.dumps(body), status_code=self.status, headers=headers, media_type="application/json")


def timeout_error(timeout_ms: int) -> ApiError:
    """The row hit its deadline (in the batcher) or the handler stopped waiting for it: the same 408 either way."""
    return ApiError(408, f"generation took longer than the request timeout of {timeout_ms} ms", kind="timeout_error")


def error_for(result: GenerationResult, timeout_ms: int) -> Optional[ApiError]:
    if result.finish_reason == "timeout":
        return timeout_error(timeout_ms)
    if result.finish_reason == "cancelled":
        return ApiError(503, "the endpoint is shutting down; the request was not completed", kind="unavailable_error")
    if result.finish_reason == "error":
        return ApiError(500, f"generation failed: {result.error}", kind="server_error")
    return None
