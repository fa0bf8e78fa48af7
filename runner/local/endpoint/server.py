"""The local online endpoint: a FastAPI app that behaves like an Azure ML managed online endpoint.

Routes: POST /score (Azure ML chat-completion format), POST /v1/chat/completions (OpenAI-compatible, with
server-sent-event streaming), GET /health/live, GET /health/ready. Every route but the health probes needs
`Authorization: Bearer <key>`; the `azureml-model-deployment` header pins a deployment, otherwise the traffic
percentages choose one. Errors are JSON (`{"error": {"message", "type", "param", "code"}}`) and never stop the server.

Run as its own process: `python -m runner.local.endpoint.server --name ... --key-file ... --deployments '{...}'`
(runner/local/endpoint/manager.py does this). The socket is bound before the model loads, so liveness answers at
once and readiness turns 200 when every deployment's model is loaded (in a background thread).

Request bodies are capped (`--max-request-bytes`): a larger Content-Length is refused with 413 before the body is
read, a body without one (chunked) is read only up to the cap, and a response sent before the body was read closes
the connection, so the rest is never read. With `--owner-pid` the server also ends, removing its key and state
files, when that process (ftrun) is gone without having stopped it.
"""

import argparse
import asyncio
import hmac
import json
import logging
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
from fastapi.responses import JSONResponse, StreamingResponse

from runner.atomic import write_text
from runner.local.endpoint.batching import BatcherClosed, DynamicBatcher
from runner.local.endpoint.generation import ContextLengthError, GenerationJob, GenerationResult

log = logging.getLogger("runner.endpoint")

DEPLOYMENT_HEADER = "azureml-model-deployment"
ROLES = ("system", "user", "assistant")
SCORE_PARAMETERS = ("temperature", "top_p", "top_k", "do_sample", "max_new_tokens", "return_full_text", "stop")
MAX_CHOICES = 8
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # deployment.max_request_bytes: a few MB is far beyond any model's context
INLINE_PARSE_BYTES = 64 * 1024  # larger bodies are parsed in a worker thread, never on the event loop
OWNER_POLL_S = 0.5


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, param: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}
        return JSONResponse(body, status_code=self.status, headers=headers)


# ---------------------------------------------------------------- request parsing (pure, no model needed)

def _number(value, path: str, *, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{path} must be a number, got {json.dumps(value)}", param=path)
    if value < low or value > high or (low_open and value == low):
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


def _stop_strings(value, path: str) -> List[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items) or len(items) > 4:
        raise ApiError(400, f"{path} must be a non-empty string or a list of at most 4 of them", param=path)
    return items


def parse_messages(value, path: str) -> List[Dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"{path} must be a non-empty list of {{role, content}} messages", param=path)
    messages = []
    for i, message in enumerate(value):
        where = f"{path}[{i}]"
        _object(message, where)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {list(ROLES)}, got {json.dumps(role)}", param=f"{where}.role")
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string, got {json.dumps(content)}", param=f"{where}.content")
        messages.append({"role": role, "content": content})
    return messages


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", param="body") from None


def parse_score_request(body) -> Tuple[List[Dict[str, str]], Dict[str, Any]]:
    """The Azure ML chat-completion scoring format → (messages, sampling settings)."""
    _object(body, "body")
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
        messages = parse_messages(turns[0], "input_data.input_string[0]")
    else:
        messages = parse_messages(turns, "input_data.input_string")
    if "params" in body and body["params"] is not None:
        _object(body["params"], "params")
    params = _object(data.get("parameters") or {}, "input_data.parameters")
    where = "input_data.parameters"
    unknown = sorted(set(params) - set(SCORE_PARAMETERS))
    if unknown:
        raise ApiError(400, f"{where}.{unknown[0]} is not a supported parameter; supported: {list(SCORE_PARAMETERS)}",
                       param=f"{where}.{unknown[0]}")
    settings: Dict[str, Any] = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                                "max_new_tokens": None, "stop": []}
    if "temperature" in params:
        settings["temperature"] = _number(params["temperature"], f"{where}.temperature", low=0, high=100)
    if "top_p" in params:
        settings["top_p"] = _number(params["top_p"], f"{where}.top_p", low=0, high=1, low_open=True)
    if "top_k" in params:
        settings["top_k"] = _integer(params["top_k"], f"{where}.top_k", low=0)
    if "do_sample" in params:
        settings["do_sample"] = _boolean(params["do_sample"], f"{where}.do_sample")
    if "max_new_tokens" in params:
        settings["max_new_tokens"] = _integer(params["max_new_tokens"], f"{where}.max_new_tokens", low=1)
    if "return_full_text" in params and _boolean(params["return_full_text"], f"{where}.return_full_text"):
        raise ApiError(400, f"{where}.return_full_text=true is not supported: the output is the reply only",
                       param=f"{where}.return_full_text")
    settings["stop"] = _stop_strings(params.get("stop"), f"{where}.stop")
    return messages, settings


def parse_chat_request(body) -> Tuple[List[Dict[str, str]], Dict[str, Any], Dict[str, Any]]:
    """An OpenAI chat.completions request → (messages, sampling settings, options {model, n, stream, usage})."""
    _object(body, "body")
    if "messages" not in body:
        raise ApiError(400, "messages is required (a list of {role, content})", param="messages")
    messages = parse_messages(body["messages"], "messages")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model must be a string", param="model")
    temperature = 1.0 if body.get("temperature") is None else _number(body["temperature"], "temperature", low=0, high=2)
    top_p = 1.0 if body.get("top_p") is None else _number(body["top_p"], "top_p", low=0, high=1, low_open=True)
    max_tokens = None
    for key in ("max_completion_tokens", "max_tokens"):
        if body.get(key) is not None:
            max_tokens = _integer(body[key], key, low=1)
    n = 1 if body.get("n") is None else _integer(body["n"], "n", low=1, high=MAX_CHOICES)
    stream = False if body.get("stream") is None else _boolean(body["stream"], "stream")
    stream_options = _object(body.get("stream_options") or {}, "stream_options")
    settings = {"do_sample": temperature > 0, "temperature": temperature, "top_p": top_p, "top_k": 0,
                "max_new_tokens": max_tokens, "stop": _stop_strings(body.get("stop"), "stop")}
    options = {"model": model, "n": n, "stream": stream, "include_usage": bool(stream_options.get("include_usage"))}
    return messages, settings, options


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


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) by its Content-Length before any of it is read, or once more than `limit` bytes
    arrived when it has none (chunked): what is beyond the cap is never read or held."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.strip().isascii() and declared.strip().isdigit()):
            raise ApiError(400, f"Content-Length must be a number of bytes, got {declared!r}", param="Content-Length")
        if int(declared) > limit:
            raise _too_large(limit, f"{int(declared)} bytes (Content-Length)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit, f"more than {limit} bytes")
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

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load, name="model-loader", daemon=True).start()
        yield
        state.draining = True
        for batcher in state.batchers():
            batcher.close(timeout=settings.shutdown_grace_s)
        log.info("endpoint %s stopped", settings.name)

    app = FastAPI(title=f"local endpoint {settings.name}", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.endpoint = state
    app.add_middleware(CloseUnreadBodies)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        if exc.status >= 500 or exc.status == 408:
            log.warning("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
        return exc.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("%s %s failed:\n%s", request.method, request.url.path, traceback.format_exc())
        return ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error").response()

    @app.get("/health/live")
    async def live():
        return {"status": "alive"}

    @app.get("/health/ready")
    async def ready():
        if state.load_error:
            return JSONResponse({"status": "failed", "error": state.load_error}, status_code=500)
        if not state.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready", "name": settings.name, "deployments": sorted(state.deployments),
                "traffic": settings.traffic, "batching": [b.stats() for b in state.batchers()]}

    async def _prepare(request: Request, parse):
        """Auth, body, routing and readiness, in the order a client would want the errors reported."""
        _check_key(request, settings.key)
        raw = await read_body(request, settings.max_request_bytes)
        if len(raw) > INLINE_PARSE_BYTES:  # a big body's parse must not hold up the other clients
            parsed = await asyncio.to_thread(lambda: parse(parse_json(raw)))
        else:
            parsed = parse(parse_json(raw))
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
        try:
            max_new = generator.check_fits(len(prompt), sampling["max_new_tokens"])
        except ContextLengthError as exc:
            param = "max_new_tokens" if sampling["max_new_tokens"] else "messages"
            raise ApiError(413, str(exc), param=param, kind="context_length_exceeded") from None
        return [GenerationJob(prompt, max_new, do_sample=sampling["do_sample"], temperature=sampling["temperature"],
                              top_p=sampling["top_p"], top_k=sampling["top_k"], stop=sampling["stop"],
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

    async def _complete(deployment, jobs, deadline) -> List[GenerationResult]:
        futures = _submit(deployment, jobs)
        try:
            results = await asyncio.wait_for(asyncio.gather(*futures), max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            raise _timeout_error(settings.request_timeout_ms) from None
        finally:
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
        (messages, sampling), deployment = await _prepare(request, parse_score_request)
        jobs = await _make_jobs(deployment, messages, sampling, 1, deadline)
        [result] = await _complete(deployment, jobs, deadline)
        return JSONResponse({"output": result.text}, headers={DEPLOYMENT_HEADER: deployment.name})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        deadline = time.monotonic() + timeout_s
        pinned = request.headers.get(DEPLOYMENT_HEADER)
        (messages, sampling, options), deployment = await _prepare(request, parse_chat_request)
        if not pinned and options["model"] in state.deployments:  # the OpenAI "model" may name a deployment
            deployment = state.deployments[options["model"]]
        jobs = await _make_jobs(deployment, messages, sampling, options["n"], deadline)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        headers = {DEPLOYMENT_HEADER: deployment.name}
        if options["stream"]:
            events = _stream_events(deployment, jobs, deadline, completion_id, created, options)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        results = await _complete(deployment, jobs, deadline)
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


def main(argv=None) -> int:
    import uvicorn

    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    )
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

    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 1)
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
