"""The endpoint app: routes (/score, /v1/chat/completions, the health probes, /openapi.json behind the key), the
lifespan (the model loads in a thread; shutdown drains), and the middleware that keeps one request's failure its
own. What a route does is the protocol's parse (protocol.py), the limits and key (limits.py), then the engine
(engine.py)."""

import asyncio
import logging
import threading
import time
import traceback
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from runner.local.endpoint.api_errors import ApiError
from runner.local.endpoint.drain import DrainUnreadBodies
from runner.local.endpoint.engine import Deployment, EndpointState
from runner.local.endpoint.limits import CloseUnreadBodies, check_key, has_key, read_body
from runner.local.endpoint.parse_pool import ParserPool
from runner.local.endpoint.protocol import DEPLOYMENT_HEADER, INLINE_PARSE_BYTES, chat_completion, parse_request
from runner.local.endpoint.server_log import one_line_disconnect
from runner.local.endpoint.settings import EndpointSettings

log = logging.getLogger("runner.endpoint")


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


def create_app(settings: EndpointSettings) -> FastAPI:
    from contextlib import asynccontextmanager

    state = EndpointState(settings)
    parsers = ParserPool(settings.limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=state.load, name="model-loader", daemon=True).start()
        parsers.warm_up()
        yield
        state.draining = True
        parsers.shutdown()
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

    _add_probes(app, state)
    _add_generation_routes(app, state, parsers)
    return app


def _add_probes(app: FastAPI, state: EndpointState) -> None:
    """Liveness, readiness (details only with the key) and the OpenAPI schema (only with the key)."""
    settings = state.settings

    @app.get("/health/live")
    async def live():
        return {"status": "alive"}

    @app.get("/health/ready")
    async def ready(request: Request):
        # without the key: ready or not, nothing else (names, traffic and load are the operator's business)
        if not has_key(request, settings.key):
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
        check_key(request, settings.key)
        return app.openapi()


def _add_generation_routes(app: FastAPI, state: EndpointState, parsers: ParserPool) -> None:
    """POST /score and POST /v1/chat/completions: key, body, parse, deployment, readiness; then the engine."""
    settings = state.settings
    timeout_s = settings.request_timeout_ms / 1000.0

    async def _prepare(request: Request, route: str):
        """Auth, body, routing and readiness, in the order a client would want the errors reported."""
        check_key(request, settings.key)
        raw = await read_body(request, settings.max_request_bytes, settings.body_timeout_s)
        if len(raw) > INLINE_PARSE_BYTES:  # a big body's parse must not hold up the other clients
            parsed = await parsers.parse(route, raw)
        else:
            parsed = parse_request(route, raw, settings.limits)
        deployment = state.choose(request.headers.get(DEPLOYMENT_HEADER) or None)
        if state.draining:
            raise ApiError(503, "the endpoint is shutting down", kind="unavailable_error")
        if not state.ready.is_set():
            raise ApiError(503, f"the endpoint is still loading its model ({state.load_error or 'not ready yet'})",
                           kind="unavailable_error")
        return parsed, deployment

    async def _make_jobs(deployment: Deployment, messages, sampling, count: int, deadline: float):
        return await asyncio.to_thread(state.make_jobs, deployment, messages, sampling, count, deadline)

    @app.post("/score")
    async def score(request: Request):
        deadline = time.monotonic() + timeout_s
        (messages, sampling), deployment = await _prepare(request, "score")
        jobs = await _make_jobs(deployment, messages, sampling, 1, deadline)
        [result] = await state.complete(request, deployment, jobs, deadline)
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
            events = state.stream_events(deployment, jobs, deadline, completion_id, created, options)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        results = await state.complete(request, deployment, jobs, deadline)
        return JSONResponse(chat_completion(completion_id, created, deployment.name, results), headers=headers)
