"""Dynamic batching: concurrent requests wait a few milliseconds for company, then share one generate call.

A single worker thread owns the model. While it is busy with one batch, new jobs queue up; when it is free it
takes up to `max_batch_size` of them, waiting while newcomers keep arriving less than `window_ms` apart (at most
MAX_WINDOWS windows after the oldest one arrived; jobs that already waited through the previous batch go at once).
Results are delivered per job through the job's callbacks; the batcher counts the tokens each job generated and
how it finished (`stats()`), which shows, e.g., that cancelled jobs stopped early.
"""

import collections
import logging
import threading
import time
from typing import Callable, Deque, List, Optional, Sequence, Tuple

from runner.local.endpoint.generation import GenerationJob, GenerationResult, deliver


log = logging.getLogger("runner.endpoint.batching")

MAX_WINDOWS = 4  # the longest a job waits for company, in batch windows ...
WAIT_SHARE = 0.25  # ... or this share of the last batch's run time, if longer


class BatcherClosed(RuntimeError):
    """The endpoint is shutting down and takes no new work."""


class DynamicBatcher:
    def __init__(self, run_batch: Callable[[Sequence[GenerationJob]], None], *, max_batch_size: int = 16,
                 window_ms: float = 10.0, name: str = "batcher"):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if window_ms < 0:
            raise ValueError(f"batch window must be >= 0 ms, got {window_ms}")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.window_s = window_ms / 1000.0
        self._queue: Deque[Tuple[float, GenerationJob]] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._running: List[GenerationJob] = []
        self._free_since = 0.0  # when the worker last finished a batch
        self._last_run_s = 0.0  # how long that batch ran
        self._expected = 0  # jobs likely to come back soon: that batch's clients and those who queued meanwhile
        self.batches = 0
        self.jobs_done = 0
        self.largest_batch = 0
        self.tokens_generated = 0
        self.finished: collections.Counter = collections.Counter()  # finish_reason -> jobs
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: GenerationJob) -> None:
        with self._cond:
            if self._closed:
                raise BatcherClosed("the endpoint is shutting down")
            self._count_when_done(job)
            self._queue.append((time.monotonic(), job))
            self._cond.notify()

    def _count_when_done(self, job: GenerationJob) -> None:
        delivered = job.on_done

        def counted(result: GenerationResult):
            with self._cond:  # counting never stands in the way of the delivery
                self.tokens_generated += getattr(result, "completion_tokens", 0) or 0
                self.finished[getattr(result, "finish_reason", "?")] += 1
            if delivered is not None:
                delivered(result)

        job.on_done = counted

    def stats(self) -> dict:
        with self._cond:
            return {
                "batches": self.batches,
                "requests": self.jobs_done,
                "mean_batch_size": round(self.jobs_done / self.batches, 2) if self.batches else 0.0,
                "largest_batch": self.largest_batch,
                "queued": len(self._queue),
                "running": len(self._running),
                "tokens_generated": self.tokens_generated,
                "finished": dict(self.finished),
            }

    def _take_batch(self) -> Optional[List[GenerationJob]]:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None  # closed and drained
            # Wait for company until the batch is full, or no one joined for a whole window, or the longest wait
            # passed (MAX_WINDOWS windows, or WAIT_SHARE of the last batch's run time if longer). Under load, the
            # clients the last batch answered come back spread over tens of ms: until as many jobs wait as took
            # part in the last round, keep waiting for them (up to the longest wait after the worker got free),
            # or a few stragglers leave alone and the clients stay split into a big and a tiny batch for good.
            longest = max(MAX_WINDOWS * self.window_s, WAIT_SHARE * self._last_run_s)
            while len(self._queue) < self.max_batch_size and not self._closed:
                now = time.monotonic()
                oldest = max(self._queue[0][0], self._free_since)
                newest = max(self._queue[-1][0], self._free_since)
                if len(self._queue) < self._expected and now < self._free_since + longest:
                    deadline = self._free_since + longest
                else:
                    deadline = min(newest + self.window_s, oldest + longest)
                left = deadline - now
                if left <= 0:
                    break
                self._cond.wait(left)
            batch = [self._queue.popleft()[1] for _ in range(min(self.max_batch_size, len(self._queue)))]
            self._running = batch
            return batch

    def _loop(self) -> None:
        while True:
            prev_free = self._free_since
            batch = self._take_batch()
            if batch is None:
                return
            t0 = time.monotonic()
            try:
                self._run_batch(batch)
            except Exception as exc:  # the generator failed outside a row: fail those rows, keep the worker alive
                for job in batch:
                    deliver(job, GenerationResult("", "error", len(job.prompt_ids), 0, f"{type(exc).__name__}: {exc}"))
            with self._cond:
                self._running = []
                self._free_since = time.monotonic()
                self._last_run_s = self._free_since - t0
                self._expected = min(self.max_batch_size, len(batch) + len(self._queue))
                log.debug("batch of %d: waited %.1f ms after the worker got free, ran %.1f ms; %d queued now",
                          len(batch), (t0 - prev_free) * 1000, (self._free_since - t0) * 1000, len(self._queue))
                self.batches += 1
                self.jobs_done += len(batch)
                self.largest_batch = max(self.largest_batch, len(batch))

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking work; let queued and running jobs finish within `timeout`, then cancel what is left."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.cancel_pending()
            self._thread.join(5.0)

    def cancel_pending(self) -> None:
        """Fail queued jobs and stop running ones at their next token (finish_reason "cancelled")."""
        with self._cond:
            queued, running = [job for _, job in self._queue], list(self._running)
            self._queue.clear()
        for job in queued:
            deliver(job, GenerationResult("", "cancelled", len(job.prompt_ids), 0, "the endpoint shut down"))
        for job in running:
            job.cancelled.set()
