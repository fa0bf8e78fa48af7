"""The local online endpoint's server process: a FastAPI app (app.py) that behaves like an Azure ML managed online
endpoint.

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
from runner.local.endpoint.limits import DEFAULT_LIMITS, MAX_REQUEST_BYTES, RequestLimits, slow_client_protocol
from runner.local.endpoint.server_log import RotatingStderrHandler
from runner.local.endpoint.settings import EndpointSettings

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


def settings_from_args(args: argparse.Namespace) -> EndpointSettings:
    """The one settings object the app runs with, from the command line (the key read once from its file)."""
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
    return settings


def main(argv=None) -> int:
    import uvicorn

    args = _parse_args(argv)
    handler = RotatingStderrHandler()  # the server log is bounded (server_log.py)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    settings = settings_from_args(args)
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
             settings.deployments, settings.traffic)
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
                _remove_own_files(Path(args.key_file), settings.key, Path(args.state_file) if args.state_file else None)
                log.info("endpoint %s stopped after its owner was gone; key and state files removed", args.name)
    return 1 if state.load_error else 0


if __name__ == "__main__":
    sys.exit(main())
