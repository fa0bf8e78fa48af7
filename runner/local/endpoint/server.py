"""The local online endpoint's server process: a FastAPI app (app.py) that behaves like an Azure ML managed online
endpoint.

Routes: POST /score (Azure ML chat-completion format), POST /v1/chat/completions (OpenAI-compatible, with
server-sent-event streaming), GET /health/live, GET /health/ready. Every route but the health probes needs
`Authorization: Bearer <key>`; the `azureml-model-deployment` header pins a deployment, otherwise the traffic
percentages choose one. Errors are JSON (`{"error": {"message", "type", "param", "code"}}`) and never stop the server.

Run as its own process: `python -m runner.local.endpoint.server --settings <state_dir>/<name>.settings.json`
(runner/local/endpoint/manager.py writes that file, an EndpointSettings without the key, and starts this; the key is
read once from the settings' key_file). The socket is bound before the model loads, so liveness answers at
once and readiness turns 200 when every deployment's model is loaded (in a background thread).

Request bodies are capped (`max_request_bytes`): a larger Content-Length is refused with 413 before the body is
read, a body without one (chunked) is kept only up to the cap, and a response sent before the body was read goes
out once the rest has been read and discarded (bounded: drain.py), so a plain client reads it instead of a reset;
beyond that bound the connection closes. With `owner_pid` set the server also ends, removing its key, settings and
state files, when that process (ftrun) is gone without having stopped it.

Hostile input harms only its own request: every sampling parameter must be finite and in range (NaN, Infinity and
numbers beyond a float are refused while parsing), a body nested too deeply or text with a lone surrogate is a 400,
the size limits (`RequestLimits`: messages, prompt characters, stop strings) are checked before anything is
tokenized, a generation error fails only the request that caused it (its batch is retried row by row), an
unexpected error is a JSON 500 that keeps the keep-alive connection usable, a client that goes away cancels its
generation, and a connection must send its request headers within `header_timeout_s` and its body within
`body_timeout_s` (slowloris). Without the key the health probes say only ready / not ready and /openapi.json is
refused.
"""

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import List, Optional

from runner.atomic import write_text
from runner.local.endpoint.app import create_app
from runner.local.endpoint.engine import EndpointState
from runner.local.endpoint.limits import slow_client_protocol
from runner.local.endpoint.server_log import RotatingStderrHandler
from runner.local.endpoint.settings import EndpointSettings, SettingsError

log = logging.getLogger("runner.endpoint")

OWNER_POLL_S = 0.5


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
    # listening from here on: a client that connects between the port file and uvicorn's start waits in the backlog
    # instead of being refused (the manager hands out the URL as soon as the port file exists)
    sock.listen(2048)
    return sock


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runner.local.endpoint.server",
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    # the one argument: everything else is in the file (EndpointSettings), so no setting (and never the key) shows
    # in `ps`, and the manager recognises its server by this path (manager._is_our_server)
    p.add_argument("--settings", required=True, metavar="FILE",
                   help="the endpoint settings JSON the manager wrote (runner/local/endpoint/settings.py)")
    return p.parse_args(argv)


def load_settings(path: str) -> EndpointSettings:
    """The settings file, checked; a bad one ends the process with one line naming the key, not a traceback."""
    try:
        return EndpointSettings.from_file(path)
    except SettingsError as exc:
        raise SystemExit(f"endpoint server: {exc}") from None


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


def _remove_own_files(settings: EndpointSettings, settings_file: Path) -> None:
    """The key, settings and state files, if they are still this server's (a newer endpoint of that name has its
    own: it writes its key first, so while the key is ours the settings file is ours too)."""
    try:
        if Path(settings.key_file).read_text(encoding="utf-8").strip() == settings.key:
            Path(settings.key_file).unlink(missing_ok=True)
            settings_file.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
    if settings.state_file is not None:
        state_file = Path(settings.state_file)
        try:
            if json.loads(state_file.read_text(encoding="utf-8")).get("pid") == os.getpid():
                state_file.unlink(missing_ok=True)
        except (FileNotFoundError, ValueError, AttributeError):
            pass


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

    settings_file = _parse_args(argv).settings
    settings = load_settings(settings_file)
    handler = RotatingStderrHandler()  # the server log is bounded (server_log.py)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler])
    app = create_app(settings)
    state: EndpointState = app.state.endpoint
    sock = _bind(settings.host, settings.port)
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
    config = uvicorn.Config(app, log_level=settings.log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 1,
                            http=protocol, timeout_keep_alive=settings.keep_alive_timeout_s,
                            limit_concurrency=limit_concurrency)
    server = _Server(config)
    state.on_load_failure = lambda: setattr(server, "should_exit", True)
    if settings.port_file:
        write_text(Path(settings.port_file), json.dumps({"port": port, "pid": os.getpid()}))
    log.info("endpoint %s listening on http://%s:%d (deployments %s, traffic %s)", settings.name, settings.host, port,
             settings.deployments, settings.traffic)
    watch = None
    if settings.owner_pid is not None:
        def owner_gone():
            drain(f"owner {settings.owner_pid} gone")
            server.should_exit = True

        watch = OwnerWatch(settings.owner_pid, owner_gone)
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
                _remove_own_files(settings, Path(settings_file))
                log.info("endpoint %s stopped after its owner was gone; key, settings and state files removed",
                         settings.name)
    return 1 if state.load_error else 0


if __name__ == "__main__":
    sys.exit(main())
