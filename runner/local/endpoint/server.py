"""The local online endpoint: a FastAPI app that behaves like an Azure ML managed online endpoint.

Routes: POST /score (Azure ML chat-completion format), POST /v1/chat/completions (OpenAI-compatible, with
server-sent-event streaming), GET /health/live, GET /health/ready. Every route but the health probes needs
`Authorization: Bearer <key>`; the `azureml-model-deployment` header pins a deployment, otherwise the traffic
percentages choose one. Errors are JSON (`{"error": {"message", "type", "param", "code"}}`) and never stop the server.

Run as its own process: `python -m runner.local.endpoint.server --name ... --key-file ... --deployments '{...}'`
(runner/local/endpoint/manager.py does this). The socket is bound before the model loads, so liveness answers at
once and readiness turns 200 when every deployment's model is loaded (in a background thread).

Request bodies are capped (`--max-request-bytes`): a larger Content-Length is refused with 413 before the body is
read, a body without one (chunked) is kept only up to the cap, and a response sent before the body was read goes
out once the rest has been read and discarded (bounded: drain.py), so a plain client reads it instead of a reset;
beyond that bound the connection closes. With `--owner-pid` the server also ends, removing its key and state
files, when that process (ftrun) is gone without having stopped it.

Hostile input harms only its own request: every sampling parameter must be finite and in range (NaN, Infinity and
numbers beyond a float are refused while parsing), a body nested too deeply or text with a lone surrogate is a 400,
the size limits (`RequestLimits`: messages, prompt characters, stop strings) are checked before anything is
tokenized, a generation error fails only the request that caused it (its batch is retried row by row), an
unexpected error is a JSON 500 that keeps the keep-alive connection usable, a client that goes away cancels its
generation, and a connection must send its request headers within `--header-timeout-s` and its body within
`--body-timeout-s` (slowloris). Without the key the health probes say only ready / not ready and /openapi.json is
refused.
"""

import argparse
import asyncio
import hmac
import json
import logging
import math
import os
import random
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from runner.atomic import write_text
from runner.local.endpoint.batching import BatcherClosed, DynamicBatcher
from runner.local.endpoint.drain import DrainUnreadBodies
from runner.local.endpoint.generation import ContextLengthError, GenerationJob, GenerationResult
from runner.local.endpoint.server_log import RotatingStderrHandler, one_line_disconnect
from runner.local.endpoint.wire_shapes import ShapeError, check_score_shape, message_content

log = logging.getLogger("runner.endpoint")

DEPLOYMENT_HEADER = "azureml-model-deployment"
ROLES = ("system", "user", "assistant")
SCORE_PARAMETERS = ("temperature", "top_p", "top_k", "do_sample", "max_new_tokens", "return_full_text", "stop")
MAX_CHOICES = 8
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # deployment.max_request_bytes: a few MB is far beyond any model's context
# Larger bodies are parsed in parser processes: json.loads holds the GIL, and one 4 MB body of 140,000 empty
# messages took ~120 ms of it, stalling the event loop and the generating thread for every other client.
INLINE_PARSE_BYTES = 64 * 1024
PARSE_WORKERS = 2
OWNER_POLL_S = 0.5
# Ranges that no request may leave: finite, and far from where a float32 division or an int overflows.
MAX_TEMPERATURE = {"score": 100.0, "chat": 2.0}  # the chat route keeps OpenAI's range
MAX_TOP_K = 1_000_000
MAX_NEW_TOKENS = 1_000_000  # the model's context is the real bound; this only keeps the number sane


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


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}
        # ASCII-escaped: a message that quotes the client's text (a lone surrogate even) can always be sent
        return Response(json.dumps(body), status_code=self.status, headers=headers, media_type="application/json")


# ---------------------------------------------------------------- request parsing (pure, no model needed)

def _number(value, path: str, *, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{path} must be a number, got {json.dumps(value)}", param=path)
    # NaN compares false with everything: without the isfinite it would pass any range check
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ApiError(400, f"{path} must be in {bracket}{low}, {high}], got {value}", param=path)
    return float(value)


def _integer(value, path: str, *, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{path} must be an integer, got {json.dumps(value)}", param=path)
    if value < low or (high is not None and value > high):
        raise ApiError(400, f"{path} must be an integer in [{low}, {high if high is not None else 'inf'}], got {value}",
                       param=path)
    return value


def _boolean(value, path: str) -> bool:
    if not isinstance(value, bool):
        raise ApiError(400, f"{path} must be true or false, got {json.dumps(value)}", param=path)
    return value


def _object(value, path: str) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise ApiError(400, f"{path} must be a JSON object, got {type(value).__name__}", param=path)
    return value


def _text(value: str, path: str) -> str:
    """JSON lets a string hold a lone surrogate ("\\ud800"): no tokenizer can encode it, so it is refused here."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{path} holds a lone surrogate (\\u{ord(value[exc.start]):04x}) at character "
                            f"{exc.start}; text must be valid Unicode", param=path) from None
    return value


def _stop_strings(value, path: str, limits: RequestLimits = DEFAULT_LIMITS) -> List[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    most = limits.max_stop_strings
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise ApiError(400, f"{path} must be a non-empty string or a list of at most {most} of them", param=path)
    if len(items) > most:
        raise ApiError(400, f"{path} holds {len(items)} stop strings; this endpoint accepts at most {most} "
                            f"(deployment.max_stop_strings)", param=path)
    for i, stop in enumerate(items):
        if len(stop) > limits.max_stop_chars:
            raise ApiError(400, f"{path}[{i}] is {len(stop)} characters; a stop string may have at most "
                                f"{limits.max_stop_chars} (deployment.max_stop_chars)", param=path)
        _text(stop, path)
    return items


def _shape(check, *args):
    try:
        return check(*args)
    except ShapeError as exc:
        raise ApiError(400, exc.message, param=exc.param) from None


def parse_messages(value, path: str, limits: RequestLimits = DEFAULT_LIMITS) -> List[Dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"{path} must be a non-empty list of {{role, content}} messages", param=path)
    if len(value) > limits.max_messages:  # before looking at any of them
        raise ApiError(413, f"{path} holds {len(value)} messages; this endpoint accepts at most "
                            f"{limits.max_messages} (deployment.max_messages)", param=path, kind="request_too_large")
    messages, chars = [], 0
    for i, message in enumerate(value):
        where = f"{path}[{i}]"
        _object(message, where)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {list(ROLES)}, got {json.dumps(role)}", param=f"{where}.role")
        content = _shape(message_content, content, f"{where}.content")  # a string, or text parts (wire_shapes.py)
        chars += len(content)
        if chars > limits.max_prompt_chars:
            raise ApiError(413, f"{path} holds more than {limits.max_prompt_chars} characters of content; this "
                                f"endpoint accepts at most {limits.max_prompt_chars} (deployment.max_prompt_chars)",
                           param=path, kind="request_too_large")
        messages.append({"role": role, "content": _text(content, f"{where}.content")})
    return messages


def _refuse_constant(name: str):
    raise ApiError(400, f"the request body holds {name}: numbers must be finite (JSON has no NaN or Infinity)",
                   param="body")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 is a valid JSON number that no float holds
        raise ApiError(400, f"the number {text[:40]} in the request body is beyond the range of a float; numbers "
                            f"must be finite", param="body")
    return value


def parse_json(raw: bytes) -> Any:
    """The body as JSON; refused with 400: invalid JSON, NaN / Infinity / overflowing numbers (Python's json takes
    them), integers of more digits than Python converts, and nesting deeper than the parser's recursion limit."""
    try:
        return json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply (JSON arrays/objects inside each other); a "
                            "request needs no more than a few levels", param="body") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and ints beyond sys.get_int_max_str_digits
        raise ApiError(400, f"the request body is not valid JSON: {exc}", param="body") from None


def parse_score_request(body, limits: RequestLimits = DEFAULT_LIMITS) -> Tuple[List[Dict[str, str]], Dict[str, Any]]:
    """The Azure ML chat-completion scoring format → (messages, sampling settings)."""
    _object(body, "body")
    score_parameters = _shape(check_score_shape, body)  # unknown keys, non-object parameters (wire_shapes.py)
    if "input_data" not in body:
        raise ApiError(400, "input_data is required: {\"input_data\": {\"input_string\": [...], \"parameters\": {...}}}",
                       param="input_data")
    data = _object(body["input_data"], "input_data")
    if "input_string" not in data:
        raise ApiError(400, "input_data.input_string is required (a list of {role, content} messages)",
                       param="input_data.input_string")
    turns = data["input_string"]
    if isinstance(turns, list) and turns and isinstance(turns[0], list):  # the notebook's nested form
        if len(turns) != 1:
            raise ApiError(400, f"input_data.input_string holds {len(turns)} conversations; send exactly one",
                           param="input_data.input_string")
        messages = parse_messages(turns[0], "input_data.input_string[0]", limits)
    else:
        messages = parse_messages(turns, "input_data.input_string", limits)
    if "params" in body and body["params"] is not None:
        _object(body["params"], "params")
    params = score_parameters
    where = "input_data.parameters"
    unknown = sorted(set(params) - set(SCORE_PARAMETERS))
    if unknown:
        raise ApiError(400, f"{where}.{unknown[0]} is not a supported parameter; supported: {list(SCORE_PARAMETERS)}",
                       param=f"{where}.{unknown[0]}")
    settings: Dict[str, Any] = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                                "max_new_tokens": None, "stop": []}
    if "temperature" in params:
        settings["temperature"] = _number(params["temperature"], f"{where}.temperature", low=0,
                                          high=MAX_TEMPERATURE["score"])
    if "top_p" in params:
        settings["top_p"] = _number(params["top_p"], f"{where}.top_p", low=0, high=1, low_open=True)
    if "top_k" in params:
        settings["top_k"] = _integer(params["top_k"], f"{where}.top_k", low=0, high=MAX_TOP_K)
    if "do_sample" in params:
        settings["do_sample"] = _boolean(params["do_sample"], f"{where}.do_sample")
    if "max_new_tokens" in params:
        settings["max_new_tokens"] = _integer(params["max_new_tokens"], f"{where}.max_new_tokens", low=1,
                                              high=MAX_NEW_TOKENS)
    if "return_full_text" in params and _boolean(params["return_full_text"], f"{where}.return_full_text"):
        raise ApiError(400, f"{where}.return_full_text=true is not supported: the output is the reply only",
                       param=f"{where}.return_full_text")
    settings["stop"] = _stop_strings(params.get("stop"), f"{where}.stop", limits)
    return messages, settings


ROLE_KEYS = (b'"role":', b'"role" :')  # in JSON text a string followed by ":" is a key, never a value


def parse_request(route: str, raw: bytes, limits: RequestLimits = DEFAULT_LIMITS):
    """The body of a request to `route` ("score" or "chat"), parsed and checked.

    A body with more "role" keys than messages are allowed is refused before it is parsed: 140,000 empty messages
    are 4 MB that take ~100 ms of CPU to turn into objects, and counting the key takes ~4 ms. (A key spelled
    otherwise, `"role"  :` or with escapes, is not counted; such a body is refused after parsing instead.)"""
    roles = sum(raw.count(form) for form in ROLE_KEYS) if len(raw) > INLINE_PARSE_BYTES else 0
    if roles > limits.max_messages:
        where = "input_data.input_string" if route == "score" else "messages"
        raise ApiError(413, f"the request body holds {roles} \"role\" keys, so more messages than this endpoint "
                            f"accepts: at most {limits.max_messages} (deployment.max_messages)", param=where,
                       kind="request_too_large")
    parse = parse_score_request if route == "score" else parse_chat_request
    return parse(parse_json(raw), limits)


def _parser_process_init(server_pid: int) -> None:
    """A parser process ends when its server is gone (SIGKILL included): its task queue never reports that, since
    the process holds both ends of the pipe, and it would wait for work for ever."""
    def watch():
        while os.getppid() == server_pid:
            time.sleep(OWNER_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="server-watch", daemon=True).start()


def _parse_in_worker(route: str, raw: bytes, limits: RequestLimits):
    """parse_request in a parser process; an ApiError comes back as its fields (it does not pickle by itself)."""
    try:
        return "ok", parse_request(route, raw, limits)
    except ApiError as exc:
        return "error", (exc.status, exc.message, exc.param, exc.kind)


def parse_chat_request(body, limits: RequestLimits = DEFAULT_LIMITS
                       ) -> Tuple[List[Dict[str, str]], Dict[str, Any], Dict[str, Any]]:
    """An OpenAI chat.completions request → (messages, sampling settings, options {model, n, stream, usage})."""
    _object(body, "body")
    if "messages" not in body:
        raise ApiError(400, "messages is required (a list of {role, content})", param="messages")
    messages = parse_messages(body["messages"], "messages", limits)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model must be a string", param="model")
    if model is not None:
        _text(model, "model")
    temperature = 1.0 if body.get("temperature") is None else _number(body["temperature"], "temperature", low=0,
                                                                       high=MAX_TEMPERATURE["chat"])
    top_p = 1.0 if body.get("top_p") is None else _number(body["top_p"], "top_p", low=0, high=1, low_open=True)
    max_tokens = None
    for key in ("max_completion_tokens", "max_tokens"):
        if body.get(key) is not None:
            max_tokens = _integer(body[key], key, low=1, high=MAX_NEW_TOKENS)
    n = 1 if body.get("n") is None else _integer(body["n"], "n", low=1, high=MAX_CHOICES)
    stream = False if body.get("stream") is None else _boolean(body["stream"], "stream")
    stream_options = _object(body.get("stream_options") or {}, "stream_options")
    top_k = 0 if body.get("top_k") is None else _integer(body["top_k"], "top_k", low=0, high=MAX_TOP_K)
    settings = {"do_sample": temperature > 0, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                "max_new_tokens": max_tokens, "stop": _stop_strings(body.get("stop"), "stop", limits),
                **_openai_extras(body)}
    options = {"model": model, "n": n, "stream": stream, "include_usage": bool(stream_options.get("include_usage"))}
    return messages, settings, options


def _openai_extras(body) -> Dict[str, Any]:
    """Every other OpenAI field: refused by name unless implemented (runner/local/endpoint/openai_params.py);
    the penalties and logit_bias go to the generation."""
    from runner.local.endpoint import openai_params

    try:
        openai_params.check_fields(body)
        return {**openai_params.penalties(body), "logit_bias": openai_params.logit_bias(body)}
    except openai_params.FieldError as exc:
        raise ApiError(400, str(exc), param=exc.param) from None


# ---------------------------------------------------------------- the endpoint

@dataclass
class EndpointSettings:
    name: str
    deployments: Dict[str, str]  # deployment name -> model URI
    traffic: Dict[str, int]
    key: str
    request_timeout_ms: int = 90000
    max_batch_size: int = 16
    batch_window_ms: float = 10.0
    seed: int = 0
    shutdown_grace_s: float = 10.0
    torch_threads: Optional[int] = None
    device: str = "auto"  # auto = the first CUDA GPU when one is visible, else the CPU
    load_delay_s: float = 0.0  # testing only: hold readiness back to observe the 503 of a loading endpoint
    max_request_bytes: int = MAX_REQUEST_BYTES
    limits: RequestLimits = DEFAULT_LIMITS
    header_timeout_s: float = 10.0  # a connection's request line and headers must arrive within this (slowloris)
    body_timeout_s: float = 30.0  # ... and its body within this once the headers are in
    keep_alive_timeout_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 256  # beyond this many open connections (or requests in flight), new requests get 503


@dataclass
class _Deployment:
    name: str
    uri: str
    generator: Any = None
    batcher: Optional[DynamicBatcher] = None


@dataclass
class EndpointState:
    settings: EndpointSettings
    deployments: Dict[str, _Deployment] = field(default_factory=dict)
    ready: threading.Event = field(default_factory=threading.Event)
    load_error: Optional[str] = None
    draining: bool = False
    on_load_failure: Any = None

    def __post_init__(self):
        self.deployments = {name: _Deployment(name, uri) for name, uri in self.settings.deployments.items()}
        self._rng = random.Random(self.settings.seed)
        self._rng_lock = threading.Lock()

    def load(self) -> None:
        """Load every deployment's model (once per distinct URI) and start its batcher; then ready."""
        try:
            if self.settings.load_delay_s > 0:
                log.info("test load delay: %.1fs before loading", self.settings.load_delay_s)
                time.sleep(self.settings.load_delay_s)
            import torch

            from runner.local.endpoint.generation import ChatGenerator, set_torch_threads

            torch.manual_seed(self.settings.seed)
            by_uri: Dict[str, Tuple[Any, DynamicBatcher]] = {}
            for dep in self.deployments.values():
                if dep.uri not in by_uri:
                    started = time.monotonic()
                    log.info("loading %s for deployment %s", dep.uri, dep.name)
                    generator = ChatGenerator.from_uri(dep.uri, device=self.settings.device)
                    threads = set_torch_threads(self.settings.torch_threads, generator.model)
                    batcher = DynamicBatcher(generator.run_batch, max_batch_size=self.settings.max_batch_size,
                                             window_ms=self.settings.batch_window_ms, name=f"batcher-{dep.name}")
                    by_uri[dep.uri] = (generator, batcher)
                    log.info("loaded %s in %.1fs on %s (context %d tokens, %d torch threads)", dep.uri,
                             time.monotonic() - started, generator.model.device, generator.context_length, threads)
                dep.generator, dep.batcher = by_uri[dep.uri]  # deployments of one model share its batcher
            self.ready.set()
            log.info("endpoint %s ready", self.settings.name)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("loading the model failed:\n%s", traceback.format_exc())
            if self.on_load_failure:
                self.on_load_failure()

    def batchers(self) -> List[DynamicBatcher]:
        return list({id(d.batcher): d.batcher for d in self.deployments.values() if d.batcher}.values())

    def choose(self, pinned: Optional[str]) -> _Deployment:
        if pinned:
            if pinned not in self.deployments:
                raise ApiError(404, f"deployment {pinned!r} not found in endpoint {self.settings.name!r}; it has "
                               f"{sorted(self.deployments)}", param=DEPLOYMENT_HEADER, kind="not_found_error")
            return self.deployments[pinned]
        names = [n for n in self.deployments if self.settings.traffic.get(n, 0) > 0]
        if not names:
            raise ApiError(404, f"no deployment of endpoint {self.settings.name!r} takes traffic; pin one with the "
                           f"{DEPLOYMENT_HEADER} header", param=DEPLOYMENT_HEADER, kind="not_found_error")
        with self._rng_lock:
            name = self._rng.choices(names, weights=[self.settings.traffic[n] for n in names])[0]
        return self.deployments[name]


def _check_key(request: Request, key: str) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    supplied = token.strip() if scheme.lower() == "bearer" else ""
    # constant-time comparison; the supplied token is never echoed or logged
    if not supplied or not hmac.compare_digest(supplied.encode(), key.encode()):
        raise ApiError(401, "missing or wrong key: send 'Authorization: Bearer <endpoint key>'",
                       param="Authorization", kind="authentication_error")


def _timeout_error(timeout_ms: int) -> ApiError:
    """The row hit its deadline (in the batcher) or the handler stopped waiting for it: the same 408 either way."""
    return ApiError(408, f"generation took longer than the request timeout of {timeout_ms} ms", kind="timeout_error")


def _error_for(result: GenerationResult, timeout_ms: int) -> Optional[ApiError]:
    if result.finish_reason == "timeout":
        return _timeout_error(timeout_ms)
    if result.finish_reason == "cancelled":
        return ApiError(503, "the endpoint is shutting down; the request was not completed", kind="unavailable_error")
    if result.finish_reason == "error":
        return ApiError(500, f"generation failed: {result.error}", kind="server_error")
    return None


def _too_large(limit: int, what: str) -> ApiError:
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
            raise _too_large(limit, f"{int(declared)} bytes (Content-Length)")
    body = bytearray()

    async def read():
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise _too_large(limit, f"more than {limit} bytes")

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s (deployment.body_timeout_s); "
                            f"{len(body)} bytes came", param="body", kind="timeout_error") from None
    return bytes(body)


def _body_expected(scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False


class CloseUnreadBodies:
    """ASGI middleware: a response that starts before the request body was read to its end (401, 413, ...) says
    `Connection: close`. Otherwise uvicorn would go on reading, and discarding, whatever the client still sends."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        unread = _body_expected(scope)

        async def receive_tracked():
            nonlocal unread
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                unread = False
            return message

        async def send_closing(message):
            if message["type"] == "http.response.start" and unread:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": headers + [(b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_tracked, send_closing)


class ContainErrors:
    """ASGI middleware: an unexpected exception becomes a JSON 500 for its own request, and nothing more.

    Starlette's own handler for `Exception` re-raises after answering, so uvicorn closed the connection and the
    client's next request on it failed; here the exception stops, so a keep-alive connection stays usable. Once a
    response has started (a stream) there is nothing to answer with: it ends, logged."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except ClientDisconnect:  # gone mid-body: one short line, not a traceback (nothing to answer)
            log.info(one_line_disconnect(scope))
        except Exception as exc:
            log.error("%s %s failed:\n%s", scope.get("method"), scope.get("path"), traceback.format_exc())
            if not started:
                response = ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error").response()
                await response(scope, receive, send)


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


def admission(app, settings: EndpointSettings):
    """(app, h11 protocol, uvicorn limit_concurrency): admitted keyed requests count against max_connections, and
    connections still sending headers have their own budget (admission.py says why). FTRUN_ENDPOINT_ADMISSION=uvicorn
    restores uvicorn's own limit_concurrency, for bench/endpoint_abuse.py's side-by-side only."""
    from runner.local.endpoint.admission import PENDING_PER_ADMITTED, AdmissionLimit, admission_protocol

    protocol = slow_client_protocol(settings.header_timeout_s)
    if os.environ.get("FTRUN_ENDPOINT_ADMISSION") == "uvicorn":
        return app, protocol, settings.max_connections
    return (AdmissionLimit(app, settings.max_connections, settings.key),
            admission_protocol(protocol, PENDING_PER_ADMITTED * settings.max_connections), None)


def _max_token_chars(generator) -> int:
    """The most characters one token of this tokenizer stands for (at least 1), computed once per model."""
    cached = getattr(generator, "_max_token_chars", None)
    if cached is None:
        cached = max((len(piece) for piece in generator.tokenizer.get_vocab()), default=1) or 1
        generator._max_token_chars = cached
    return cached


def create_app(settings: EndpointSettings) -> FastAPI:
    from contextlib import asynccontextmanager

    state = EndpointState(settings)
    timeout_s = settings.request_timeout_ms / 1000.0

    parsers: Dict[str, Any] = {}

    def parser_pool():
        """Processes for parsing big bodies (spawned: a fork would copy the model and torch's threads)."""
        if "pool" not in parsers:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            parsers["pool"] = ProcessPoolExecutor(PARSE_WORKERS, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_parser_process_init, initargs=(os.getpid(),))
        return parsers["pool"]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load, name="model-loader", daemon=True).start()
        parser_pool().submit(_parse_in_worker, "chat", b"{}", settings.limits)  # spawned now, not at the first
        yield
        state.draining = True
        if "pool" in parsers:  # waited for: a parse takes well under a second, and no process is left behind
            parsers.pop("pool").shutdown(wait=True, cancel_futures=True)
        for batcher in state.batchers():
            batcher.close(timeout=settings.shutdown_grace_s)
        log.info("endpoint %s stopped", settings.name)

    # no /docs or /redoc (their pages fetch the schema without a key); /openapi.json is below, behind the key
    app = FastAPI(title=f"local endpoint {settings.name}", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.endpoint = state
    app.add_middleware(ContainErrors)
    app.add_middleware(DrainUnreadBodies)  # an early 413/401 is sent after the body's rest is read (drain.py)
    app.add_middleware(CloseUnreadBodies)  # outermost: a 500 sent before the body was read closes too

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        if exc.status >= 500 or exc.status == 408:
            log.warning("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
        return exc.response()

    def _has_key(request: Request) -> bool:
        try:
            _check_key(request, settings.key)
            return True
        except ApiError:
            return False

    @app.get("/health/live")
    async def live():
        return {"status": "alive"}

    @app.get("/health/ready")
    async def ready(request: Request):
        # without the key: ready or not, nothing else (names, traffic and load are the operator's business)
        if not _has_key(request):
            if state.ready.is_set() and not state.load_error:
                return {"status": "ready"}
            return JSONResponse({"status": "not ready"}, status_code=503)
        if state.load_error:
            return JSONResponse({"status": "failed", "error": state.load_error}, status_code=500)
        if not state.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready", "name": settings.name, "deployments": sorted(state.deployments),
                "traffic": settings.traffic, "batching": [b.stats() for b in state.batchers()]}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request):
        _check_key(request, settings.key)
        return app.openapi()

    async def _parse_big(route: str, raw: bytes):
        from concurrent.futures.process import BrokenProcessPool

        try:
            outcome, value = await asyncio.get_running_loop().run_in_executor(
                parser_pool(), _parse_in_worker, route, raw, settings.limits)
        except BrokenProcessPool:  # a parser process died (killed, out of memory): a new pool for the next ones
            log.warning("a parser process died; starting new ones, parsing this body in a thread")
            parsers.pop("pool", None)
            return await asyncio.to_thread(parse_request, route, raw, settings.limits)
        if outcome == "error":
            status, message, param, kind = value
            raise ApiError(status, message, param=param, kind=kind)
        return value

    async def _prepare(request: Request, route: str):
        """Auth, body, routing and readiness, in the order a client would want the errors reported."""
        _check_key(request, settings.key)
        raw = await read_body(request, settings.max_request_bytes, settings.body_timeout_s)
        if len(raw) > INLINE_PARSE_BYTES:  # a big body's parse must not hold up the other clients
            parsed = await _parse_big(route, raw)
        else:
            parsed = parse_request(route, raw, settings.limits)
        deployment = state.choose(request.headers.get(DEPLOYMENT_HEADER) or None)
        if state.draining:
            raise ApiError(503, "the endpoint is shutting down", kind="unavailable_error")
        if not state.ready.is_set():
            raise ApiError(503, f"the endpoint is still loading its model ({state.load_error or 'not ready yet'})",
                           kind="unavailable_error")
        return parsed, deployment

    def _jobs(deployment: _Deployment, messages, sampling, count: int, deadline: float) -> List[GenerationJob]:
        """Tokenize and check the prompt. Runs in a worker thread (`_make_jobs`): tokenizing waits for the
        tokenizer lock, which generation holds while decoding, and a long prompt takes seconds."""
        generator = deployment.generator
        chars = sum(len(m["content"]) for m in messages)
        per_token = _max_token_chars(generator)
        if chars > generator.context_length * per_token:  # certainly too long: refused without tokenizing it
            raise ApiError(413, f"the messages hold {chars} characters, more than the model's context of "
                                f"{generator.context_length} tokens can hold (a token covers at most {per_token} "
                                f"characters)", param="messages", kind="context_length_exceeded")
        prompt = generator.encode_chat(messages)
        most = settings.limits.max_prompt_tokens
        if most and len(prompt) > most:
            raise ApiError(413, f"the prompt is {len(prompt)} tokens; this endpoint accepts at most {most} "
                                f"(deployment.max_prompt_tokens)", param="messages", kind="context_length_exceeded")
        try:
            max_new = generator.check_fits(len(prompt), sampling["max_new_tokens"])
        except ContextLengthError as exc:
            param = "max_new_tokens" if sampling["max_new_tokens"] else "messages"
            raise ApiError(413, str(exc), param=param, kind="context_length_exceeded") from None
        bias = sampling.get("logit_bias") or {}
        vocab = generator.model.config.get_text_config().vocab_size
        if any(token >= vocab for token in bias):
            raise ApiError(400, f"logit_bias names token {max(bias)}; the model's vocabulary has {vocab} tokens",
                           param="logit_bias")
        return [GenerationJob(prompt, max_new, do_sample=sampling["do_sample"], temperature=sampling["temperature"],
                              top_p=sampling["top_p"], top_k=sampling["top_k"], stop=sampling["stop"],
                              presence_penalty=sampling.get("presence_penalty", 0.0),
                              frequency_penalty=sampling.get("frequency_penalty", 0.0), logit_bias=bias,
                              deadline=deadline) for _ in range(count)]

    async def _make_jobs(deployment: _Deployment, messages, sampling, count: int, deadline: float):
        return await asyncio.to_thread(_jobs, deployment, messages, sampling, count, deadline)

    def _submit(deployment: _Deployment, jobs: List[GenerationJob]):
        loop = asyncio.get_running_loop()
        futures = []
        for job in jobs:
            future = loop.create_future()

            def _resolve(result, future=future):
                if not future.done():
                    future.set_result(result)

            job.on_done = lambda result, _resolve=_resolve: loop.call_soon_threadsafe(_resolve, result)
            futures.append(future)
        try:
            for job in jobs:
                deployment.batcher.submit(job)
        except BatcherClosed:
            raise ApiError(503, "the endpoint is shutting down", kind="unavailable_error") from None
        return futures

    async def _cancel_when_gone(request: Request, jobs: List[GenerationJob]):
        """The body is read, so the next ASGI message is the client's disconnect: its rows stop at their next token
        (queued ones never start), and a batch whose every row went away ends."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        if not all(job.cancelled.is_set() for job in jobs):
            log.info("%s %s: the client went away; its generation is cancelled", request.method, request.url.path)
        for job in jobs:
            job.cancelled.set()

    async def _complete(request, deployment, jobs, deadline) -> List[GenerationResult]:
        futures = _submit(deployment, jobs)
        watcher = asyncio.create_task(_cancel_when_gone(request, jobs))
        try:
            results = await asyncio.wait_for(asyncio.gather(*futures), max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            raise _timeout_error(settings.request_timeout_ms) from None
        finally:
            watcher.cancel()
            for job in jobs:  # nothing left to do for these rows (no-op when they finished)
                job.cancelled.set()
        for result in results:
            error = _error_for(result, settings.request_timeout_ms)
            if error:
                raise error
        return results

    @app.post("/score")
    async def score(request: Request):
        deadline = time.monotonic() + timeout_s
        (messages, sampling), deployment = await _prepare(request, "score")
        jobs = await _make_jobs(deployment, messages, sampling, 1, deadline)
        [result] = await _complete(request, deployment, jobs, deadline)
        return JSONResponse({"output": result.text}, headers={DEPLOYMENT_HEADER: deployment.name})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        deadline = time.monotonic() + timeout_s
        pinned = request.headers.get(DEPLOYMENT_HEADER)
        (messages, sampling, options), deployment = await _prepare(request, "chat")
        if not pinned and options["model"] in state.deployments:  # the OpenAI "model" may name a deployment
            deployment = state.deployments[options["model"]]
        jobs = await _make_jobs(deployment, messages, sampling, options["n"], deadline)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        headers = {DEPLOYMENT_HEADER: deployment.name}
        if options["stream"]:
            events = _stream_events(deployment, jobs, deadline, completion_id, created, options)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        results = await _complete(request, deployment, jobs, deadline)
        prompt_tokens = results[0].prompt_tokens
        completion_tokens = sum(r.completion_tokens for r in results)
        return JSONResponse({
            "id": completion_id, "object": "chat.completion", "created": created, "model": deployment.name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                         "finish_reason": r.finish_reason, "logprobs": None} for i, r in enumerate(results)],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }, headers=headers)

    def _stream_events(deployment, jobs, deadline, completion_id, created, options):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        for i, job in enumerate(jobs):
            job.on_delta = lambda piece, i=i: loop.call_soon_threadsafe(queue.put_nowait, ("delta", i, piece))
        futures = _submit(deployment, jobs)  # before the response starts, so a closed batcher is still a 503
        for i, future in enumerate(futures):
            future.add_done_callback(lambda f, i=i: queue.put_nowait(("done", i, f.result())))

        def chunk(choices, usage=None):
            body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                    "model": deployment.name, "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        def error_event(error: ApiError):
            return "data: " + json.dumps({"error": {"message": error.message, "type": error.kind,
                                                    "code": error.status}}) + "\n\n"

        async def events():
            try:
                for i in range(len(jobs)):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                remaining, completion_tokens, prompt_tokens = len(jobs), 0, len(jobs[0].prompt_ids)
                while remaining:
                    try:
                        kind, i, payload = await asyncio.wait_for(queue.get(), max(deadline - time.monotonic(), 0))
                    except asyncio.TimeoutError:
                        yield error_event(_timeout_error(settings.request_timeout_ms))
                        return
                    if kind == "delta":
                        yield chunk([{"index": i, "delta": {"content": payload}, "finish_reason": None}])
                        continue
                    error = _error_for(payload, settings.request_timeout_ms)
                    if error:
                        log.warning("stream %s ended with %d %s", completion_id, error.status, error.message)
                        yield error_event(error)
                        return
                    remaining -= 1
                    completion_tokens += payload.completion_tokens
                    yield chunk([{"index": i, "delta": {}, "finish_reason": payload.finish_reason}])
                if options["include_usage"]:
                    yield chunk([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                     "total_tokens": prompt_tokens + completion_tokens})
                yield "data: [DONE]\n\n"
            finally:  # finished, failed or the client went away: no more work for these rows
                for job in jobs:
                    job.cancelled.set()

        return events()

    return app


# ---------------------------------------------------------------- process entry point

def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted sockets whose proto says TCP, and
    # without it every response waited ~40 ms for a delayed ACK (Nagle), measured 45 ms for /health/live
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"cannot bind {host}:{port}: {exc}")
    return sock


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runner.local.endpoint.server", description=__doc__.split("\n")[0])
    p.add_argument("--name", required=True, help="endpoint name")
    p.add_argument("--deployments", required=True, help='JSON object: deployment name -> model URI or folder')
    p.add_argument("--traffic", default=None, help="JSON object: deployment name -> percent (default: all to one)")
    p.add_argument("--key-file", required=True, help="file holding the endpoint key (read once; never logged)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = a free port (written to --port-file)")
    p.add_argument("--port-file", default=None, help="where to write {port, pid} once the socket is bound")
    p.add_argument("--request-timeout-ms", type=int, default=90000)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-window-ms", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shutdown-grace-s", type=float, default=10.0)
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the model runs (auto = a CUDA GPU when one is visible)")
    p.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES,
                   help="larger request bodies are refused with 413 (Content-Length first, else while reading)")
    p.add_argument("--limits", default=None,
                   help="JSON object of per-request limits (RequestLimits: max_messages, max_prompt_chars, "
                        "max_prompt_tokens, max_stop_strings, max_stop_chars)")
    p.add_argument("--header-timeout-s", type=float, default=10.0,
                   help="close a connection whose request headers have not arrived within this")
    p.add_argument("--body-timeout-s", type=float, default=30.0, help="408 for a body not read within this")
    p.add_argument("--keep-alive-timeout-s", type=float, default=5.0, help="close idle keep-alive connections")
    p.add_argument("--max-connections", type=int, default=256,
                   help="503 for new requests beyond this many open connections or requests in flight")
    p.add_argument("--owner-pid", type=int, default=None,
                   help="end (and remove --key-file and --state-file) when this process is gone; unset = detached")
    p.add_argument("--state-file", default=None, help="the manager's state file, removed with the key by --owner-pid")
    p.add_argument("--log-level", default="info")
    p.add_argument("--test-load-delay-s", type=float, default=0.0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


class OwnerWatch:
    """Ends the server when the process that started it (ftrun) is gone without stopping it (SIGKILL, a crash).

    A thread polls; on Linux the kernel also signals at once (PR_SET_PDEATHSIG, SIGUSR1) when the owner is our
    parent. Either way the owner is checked again, since the signal also fires when only the parent's thread ends.
    """

    def __init__(self, owner_pid: int, on_gone):
        self.owner_pid, self.on_gone = owner_pid, on_gone
        self.parent_at_start = os.getppid()
        self.gone = threading.Event()
        self._stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def owner_alive(self) -> bool:
        if self.parent_at_start == self.owner_pid:  # orphans are re-parented: immune to a recycled pid
            return os.getppid() == self.owner_pid
        try:
            os.kill(self.owner_pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:  # a zombie owner has exited, only its parent has not reaped it yet
            return Path(f"/proc/{self.owner_pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True

    def check(self) -> None:
        if not self.gone.is_set() and not self.owner_alive():
            self.gone.set()
            log.warning("the owner process %d is gone without stopping this endpoint: shutting down", self.owner_pid)
            self.on_gone()

    def start(self) -> None:
        if sys.platform.startswith("linux") and self.parent_at_start == self.owner_pid:
            try:
                import ctypes

                signal.signal(signal.SIGUSR1, lambda signum, frame: self.check())
                ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGUSR1), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
            except (OSError, AttributeError, ValueError) as exc:
                log.info("PR_SET_PDEATHSIG unavailable (%s); polling the owner only", exc)

        def poll():
            while not self._stopped.wait(OWNER_POLL_S) and not self.gone.is_set():
                self.check()

        self._thread = threading.Thread(target=poll, name="owner-watch", daemon=True)
        self._thread.start()
        self.check()  # the owner may have died before the signal was armed

    def stop(self) -> None:
        # joined, not left to die with the process: a thread still alive at exit keeps the exited server
        # from being reaped for a moment, and whoever waits for it would see it still running
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * OWNER_POLL_S)


def _remove_own_files(key_file: Path, key: str, state_file: Optional[Path]) -> None:
    """The key and state files, if they are still this server's (a newer endpoint of that name has its own)."""
    try:
        if key_file.read_text(encoding="utf-8").strip() == key:
            key_file.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    if state_file is not None:
        try:
            if json.loads(state_file.read_text(encoding="utf-8")).get("pid") == os.getpid():
                state_file.unlink(missing_ok=True)
        except (FileNotFoundError, ValueError, AttributeError):
            pass


def _also_on_hangup(server, uvicorn_capture):
    """uvicorn's signal capture plus SIGHUP, handled as SIGTERM is (drain, then stop); restored afterwards."""
    from contextlib import ExitStack, contextmanager

    from runner.signals import handled_by

    @contextmanager
    def both():
        with ExitStack() as stack:
            stack.enter_context(handled_by(server.handle_exit, [signal.SIGHUP]))
            stack.enter_context(uvicorn_capture)
            yield

    return both()


def main(argv=None) -> int:
    import uvicorn

    args = _parse_args(argv)
    handler = RotatingStderrHandler()  # the server log is bounded (server_log.py)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    deployments = json.loads(args.deployments)
    traffic = json.loads(args.traffic) if args.traffic else {next(iter(deployments)): 100}
    key = Path(args.key_file).read_text(encoding="utf-8").strip()
    if not key:
        raise SystemExit(f"the key file {args.key_file} is empty")
    settings = EndpointSettings(
        name=args.name, deployments=deployments, traffic=traffic, key=key,
        request_timeout_ms=args.request_timeout_ms, max_batch_size=args.max_batch_size,
        batch_window_ms=args.batch_window_ms, seed=args.seed, shutdown_grace_s=args.shutdown_grace_s,
        torch_threads=args.torch_threads, device=args.device, load_delay_s=args.test_load_delay_s,
        max_request_bytes=args.max_request_bytes,
        limits=RequestLimits(**json.loads(args.limits)) if args.limits else DEFAULT_LIMITS,
        header_timeout_s=args.header_timeout_s, body_timeout_s=args.body_timeout_s,
        keep_alive_timeout_s=args.keep_alive_timeout_s, max_connections=args.max_connections,
    )
    for name in ("header_timeout_s", "body_timeout_s", "keep_alive_timeout_s", "max_connections"):
        if not getattr(settings, name) > 0:
            raise SystemExit(f"deployment.{name} must be > 0, got {getattr(settings, name)}")
    app = create_app(settings)
    state: EndpointState = app.state.endpoint
    sock = _bind(args.host, args.port)
    port = sock.getsockname()[1]

    timers: List[threading.Timer] = []

    def drain(why: str) -> None:
        # drain: no new work; what is running gets until shortly before uvicorn's own grace ends, then it is
        # cancelled so its client still gets a JSON 503 instead of a dropped connection
        if not state.draining:
            state.draining = True
            log.info("%s: draining (grace %.0fs)", why, settings.shutdown_grace_s)
            timer = threading.Timer(max(settings.shutdown_grace_s - 1.0, 0.0),
                                    lambda: [b.cancel_pending() for b in state.batchers()])
            timer.daemon = True
            timer.start()
            timers.append(timer)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            drain(f"signal {sig}")
            super().handle_exit(sig, frame)

        def capture_signals(self):
            # uvicorn installs its own SIGINT/SIGTERM handlers (even over an inherited SIG_IGN); SIGHUP drains too
            return _also_on_hangup(self, super().capture_signals())

    app, protocol, limit_concurrency = admission(app, settings)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 1,
                            http=protocol, timeout_keep_alive=settings.keep_alive_timeout_s,
                            limit_concurrency=limit_concurrency)
    server = _Server(config)
    state.on_load_failure = lambda: setattr(server, "should_exit", True)
    if args.port_file:
        write_text(Path(args.port_file), json.dumps({"port": port, "pid": os.getpid()}))
    log.info("endpoint %s listening on http://%s:%d (deployments %s, traffic %s)", args.name, args.host, port,
             deployments, traffic)
    watch = None
    if args.owner_pid is not None:
        def owner_gone():
            drain(f"owner {args.owner_pid} gone")
            server.should_exit = True

        watch = OwnerWatch(args.owner_pid, owner_gone)
        watch.start()
    try:
        server.run(sockets=[sock])
    finally:
        for timer in timers:  # joined for the same reason as the owner watch (OwnerWatch.stop)
            timer.cancel()
            timer.join(1.0)
        if watch is not None:
            watch.stop()
            if watch.gone.is_set():  # nobody is left to delete the endpoint: its files go with it
                _remove_own_files(Path(args.key_file), key, Path(args.state_file) if args.state_file else None)
                log.info("endpoint %s stopped after its owner was gone; key and state files removed", args.name)
    return 1 if state.load_error else 0


if __name__ == "__main__":
    sys.exit(main())
