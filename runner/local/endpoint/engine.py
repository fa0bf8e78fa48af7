"""The generation engine: each deployment's model loaded (once per distinct model) with its dynamic batcher
(batching.py over generation.py), a request's rows tokenized and checked, submitted, awaited or streamed, and
cancelled when the client goes away, the deadline passes or the endpoint drains."""

import asyncio
import logging
import random
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from fastapi import Request

from runner.local.endpoint.api_errors import ApiError, error_for, timeout_error
from runner.local.endpoint.batching import BatcherClosed, DynamicBatcher
from runner.local.endpoint.generation import ContextLengthError, GenerationJob, GenerationResult
from runner.local.endpoint.protocol import DEPLOYMENT_HEADER, chunk_event, error_event
from runner.local.endpoint.settings import EndpointSettings

log = logging.getLogger("runner.endpoint")


@dataclass
class Deployment:
    name: str
    uri: str
    generator: Any = None
    batcher: Optional[DynamicBatcher] = None


@dataclass
class EndpointState:
    settings: EndpointSettings
    deployments: Dict[str, Deployment] = field(default_factory=dict)
    ready: threading.Event = field(default_factory=threading.Event)
    load_error: Optional[str] = None
    draining: bool = False
    on_load_failure: Any = None

    def __post_init__(self):
        self.deployments = {name: Deployment(name, uri) for name, uri in self.settings.deployments.items()}
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

    def choose(self, pinned: Optional[str]) -> Deployment:
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

    def make_jobs(self, deployment: Deployment, messages, sampling, count: int, deadline: float
                  ) -> List[GenerationJob]:
        """Tokenize and check the prompt. Runs in a worker thread (`asyncio.to_thread`): tokenizing waits for the
        tokenizer lock, which generation holds while decoding, and a long prompt takes seconds."""
        generator = deployment.generator
        chars = sum(len(m["content"]) for m in messages)
        per_token = max_token_chars(generator)
        if chars > generator.context_length * per_token:  # certainly too long: refused without tokenizing it
            raise ApiError(413, f"the messages hold {chars} characters, more than the model's context of "
                                f"{generator.context_length} tokens can hold (a token covers at most {per_token} "
                                f"characters)", param="messages", kind="context_length_exceeded")
        prompt = generator.encode_chat(messages)
        most = self.settings.limits.max_prompt_tokens
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

    def submit(self, deployment: Deployment, jobs: List[GenerationJob]):
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

    async def complete(self, request, deployment, jobs, deadline) -> List[GenerationResult]:
        futures = self.submit(deployment, jobs)
        watcher = asyncio.create_task(cancel_when_gone(request, jobs))
        try:
            results = await asyncio.wait_for(asyncio.gather(*futures), max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            raise timeout_error(self.settings.request_timeout_ms) from None
        finally:
            watcher.cancel()
            for job in jobs:  # nothing left to do for these rows (no-op when they finished)
                job.cancelled.set()
        for result in results:
            error = error_for(result, self.settings.request_timeout_ms)
            if error:
                raise error
        return results

    def stream_events(self, deployment, jobs, deadline, completion_id, created, options):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        for i, job in enumerate(jobs):
            job.on_delta = lambda piece, i=i: loop.call_soon_threadsafe(queue.put_nowait, ("delta", i, piece))
        futures = self.submit(deployment, jobs)  # before the response starts, so a closed batcher is still a 503
        for i, future in enumerate(futures):
            future.add_done_callback(lambda f, i=i: queue.put_nowait(("done", i, f.result())))

        def chunk(choices, usage=None):
            return chunk_event(completion_id, created, deployment.name, choices, usage)

        async def events():
            try:
                for i in range(len(jobs)):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
                remaining, completion_tokens, prompt_tokens = len(jobs), 0, len(jobs[0].prompt_ids)
                while remaining:
                    try:
                        kind, i, payload = await asyncio.wait_for(queue.get(), max(deadline - time.monotonic(), 0))
                    except asyncio.TimeoutError:
                        yield error_event(timeout_error(self.settings.request_timeout_ms))
                        return
                    if kind == "delta":
                        yield chunk([{"index": i, "delta": {"content": payload}, "finish_reason": None}])
                        continue
                    error = error_for(payload, self.settings.request_timeout_ms)
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


def max_token_chars(generator) -> int:
    """The most characters one token of this tokenizer stands for (at least 1), computed once per model."""
    cached = getattr(generator, "_max_token_chars", None)
    if cached is None:
        cached = max((len(piece) for piece in generator.tokenizer.get_vocab()), default=1) or 1
        generator._max_token_chars = cached
    return cached


async def cancel_when_gone(request: Request, jobs: List[GenerationJob]):
    """The body is read, so the next ASGI message is the client's disconnect: its rows stop at their next token
    (queued ones never start), and a batch whose every row went away ends."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    if not all(job.cancelled.is_set() for job in jobs):
        log.info("%s %s: the client went away; its generation is cancelled", request.method, request.url.path)
    for job in jobs:
        job.cancelled.set()
