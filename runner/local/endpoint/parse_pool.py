"""Big request bodies parsed in parser processes, so a 4 MB body's json.loads does not hold the server's GIL (and
with it the event loop and the generating thread) for the other clients."""

import asyncio
import logging
import os
import threading
import time
from typing import Any, Optional

from runner.local.endpoint.api_errors import ApiError
from runner.local.endpoint.limits import RequestLimits
from runner.local.endpoint.protocol import parse_request

log = logging.getLogger("runner.endpoint")

PARSE_WORKERS = 2
SERVER_POLL_S = 0.5


def _parser_process_init(server_pid: int) -> None:
    """A parser process ends when its server is gone (SIGKILL included): its task queue never reports that, since
    the process holds both ends of the pipe, and it would wait for work for ever."""
    def watch():
        while os.getppid() == server_pid:
            time.sleep(SERVER_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="server-watch", daemon=True).start()


def _parse_in_worker(route: str, raw: bytes, limits: RequestLimits):
    """parse_request in a parser process; an ApiError comes back as its fields (it does not pickle by itself)."""
    try:
        return "ok", parse_request(route, raw, limits)
    except ApiError as exc:
        return "error", (exc.status, exc.message, exc.param, exc.kind)


class ParserPool:
    """Processes for parsing big bodies, started on first use (spawned: a fork would copy the model and torch's
    threads); a pool whose process died is replaced, and that body parsed in a thread."""

    def __init__(self, limits: RequestLimits):
        self.limits = limits
        self._pool: Optional[Any] = None

    def pool(self):
        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(PARSE_WORKERS, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_parser_process_init, initargs=(os.getpid(),))
        return self._pool

    def warm_up(self) -> None:
        """Spawn the processes now, not at the first big body."""
        self.pool().submit(_parse_in_worker, "chat", b"{}", self.limits)

    async def parse(self, route: str, raw: bytes):
        from concurrent.futures.process import BrokenProcessPool

        try:
            outcome, value = await asyncio.get_running_loop().run_in_executor(
                self.pool(), _parse_in_worker, route, raw, self.limits)
        except BrokenProcessPool:  # a parser process died (killed, out of memory): a new pool for the next ones
            log.warning("a parser process died; starting new ones, parsing this body in a thread")
            self._pool = None
            return await asyncio.to_thread(parse_request, route, raw, self.limits)
        if outcome == "error":
            status, message, param, kind = value
            raise ApiError(status, message, param=param, kind=kind)
        return value

    def shutdown(self) -> None:
        """Waited for: a parse takes well under a second, and no process is left behind."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=True, cancel_futures=True)
