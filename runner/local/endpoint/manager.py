"""Start, find, invoke and stop local endpoints from the workflow side (no torch here: this runs in ftrun).

An endpoint is a server process (`python -m runner.local.endpoint.server --settings FILE`) in its own session, so
a Ctrl-C in the user's terminal reaches ftrun, which then decides what to stop. What other processes need to find it
again lives in `<state_dir>/<name>.json` (url, pid, port, key file, deployments, traffic); the key itself only in a
0600 file next to it. What the server runs with is one EndpointSettings (settings.py), built once by the caller,
completed here with the paths of these files and written as `<state_dir>/<name>.settings.json`, which is all the
server's command line names. `stop_endpoint` works from any process that can read the state folder.

Unless started with `detach=True`, the server watches the process that started it (settings.owner_pid) and, should
that process die without stopping it (SIGKILL, a crash), stops by itself and removes its key, settings and state
files.

Runs that share a state root: a server is known by its pid AND a random instance token the manager hands it in its
environment (`FTRUN_ENDPOINT_INSTANCE`, read back from /proc/<pid>/environ) and records in the state file. A pid
that is alive but does not carry the token (a recycled pid, another server that took over the name) is never
adopted, waited on or stopped; a cleanup holding a state whose token is no longer the file's stops only its own
server and leaves the other server's files alone. Starting a name is serialised across processes (a lock in the
state folder, held until the server's state file is written, which happens as soon as its port is bound), so two
runs can never start two servers under one name, key and port file. Default names carry a random suffix
(`unique_name`).
"""

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Union

from runner.atomic import write_text
from runner.local.endpoint.generation import is_local_model_dir

if TYPE_CHECKING:  # settings.py imports the server's limits (FastAPI): not needed to find or stop an endpoint
    from runner.local.endpoint.settings import EndpointSettings

SERVER_MODULE = "runner.local.endpoint.server"
NAME_RULE = re.compile(r"^[A-Za-z][A-Za-z0-9-]{1,30}[A-Za-z0-9]$")  # Azure ML: 3-32 chars, letter first
PF_EXITING = 0x4  # /proc/<pid>/stat flags: the process is exiting
INSTANCE_ENV = "FTRUN_ENDPOINT_INSTANCE"  # the server's own token, in its environment and in the state file
NAMES_LOCK = ".names.lock"  # held while a name is checked and claimed (state file written)
STOP_GRACE_S = 15.0  # SIGTERM lets in-flight requests finish (the server's own grace is 10 s), then SIGKILL

SETTINGS_SUFFIX = ".settings.json"  # <state_dir>/<name>.settings.json: the server's only argument names it

_children: Dict[int, subprocess.Popen] = {}  # servers this process started: waited on so none stays a zombie


class EndpointError(RuntimeError):
    pass


# ---------------------------------------------------------------- files

def unique_name(prefix: str) -> str:
    """prefix + the time (base 36 seconds, 6 characters) + 4 random hex digits: distinct for runs started in the
    same second, and still within Azure ML's 32 characters with the default 21-character prefix."""
    digits, seconds = "0123456789abcdefghijklmnopqrstuvwxyz", int(time.time())
    stamp = ""
    while seconds:
        seconds, rest = divmod(seconds, 36)
        stamp = digits[rest] + stamp
    return f"{prefix}{stamp}{secrets.token_hex(2)}"


def _paths(name: str, state_dir) -> Dict[str, Path]:
    d = Path(state_dir)
    return {"state": d / f"{name}.json", "key": d / f"{name}.key", "log": d / f"{name}.log", "port": d / f"{name}.port",
            "settings": d / f"{name}{SETTINGS_SUFFIX}"}


def read_key(state: Dict[str, Any]) -> str:
    return Path(state["key_file"]).read_text(encoding="utf-8").strip()


def _remove_files(name: str, state_dir, keep_log: bool = True) -> None:
    for kind, path in _paths(name, state_dir).items():
        if kind != "log" or not keep_log:
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------- processes and ports

def _carries(pid: int, instance: str) -> bool:
    """Whether the process was started with this instance token (its environment, as the kernel keeps it)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return f"{INSTANCE_ENV}={instance}".encode() in environ


def _is_our_server(pid: int, name: str, instance: Optional[str] = None) -> bool:
    """The pid is alive and is the server of this endpoint (a recycled pid must never be killed); with `instance`,
    also the very server that token was given to (another server under the same name is not)."""
    if pid in _children:
        child = _children[pid]
        if instance is not None and getattr(child, "ftrun_instance", instance) != instance:
            return False
        return child.poll() is None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status, flags, threads = fields[0], int(fields[6]), int(fields[17])
    except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError, ValueError):
        return False
    # Mid-exit a process loses its cmdline before it can be reaped: until then it still counts as running, or
    # a waiter in another process returns while the server's parent cannot yet see it end.
    if status == "Z":
        return threads > 1  # the main thread is done, another is still ending
    if flags & PF_EXITING and not any(cmdline):
        return True
    args = [a.decode(errors="replace") for a in cmdline]
    if not (SERVER_MODULE in args and _settings_name(args) == name):
        return False
    return instance is None or _carries(pid, instance)


def _settings_name(args) -> Optional[str]:
    """The endpoint name a server command line carries: its only argument is `--settings <dir>/<name>.settings.json`
    (_paths), so the name is read from that file name instead of being passed again as a flag of its own. The
    instance token stays in the environment (_carries): /proc/<pid>/environ is readable only by its owner, unlike
    the command line that everyone sees in `ps`."""
    try:
        file_name = Path(args[args.index("--settings") + 1]).name
    except (ValueError, IndexError):
        return None
    return file_name[:-len(SETTINGS_SUFFIX)] if file_name.endswith(SETTINGS_SUFFIX) else None


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait_exit(pid: int, name: str, timeout: float, instance: Optional[str] = None) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pid in _children:
            try:
                _children[pid].wait(timeout=0.1)
                return True
            except subprocess.TimeoutExpired:
                continue
        if not _is_our_server(pid, name, instance):
            return True
        time.sleep(0.1)
    return not _is_our_server(pid, name, instance)


def _terminate(pid: int, name: str, grace: float = STOP_GRACE_S, instance: Optional[str] = None) -> str:
    """SIGTERM, then SIGKILL of the server's whole process group; returns how it ended. Only a process that is
    this endpoint's server (and, with `instance`, the one given that token) is signalled."""
    if not _is_our_server(pid, name, instance):
        return "not running"
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return "not running"
    if _wait_exit(pid, name, grace, instance):
        how = "terminated"
    else:
        try:
            os.killpg(pid, signal.SIGKILL)  # the server leads its own session/group
        except ProcessLookupError:
            pass
        _wait_exit(pid, name, 5.0, instance)
        how = "killed"
    child = _children.pop(pid, None)
    if child is not None:
        child.poll()
    return how


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


# ---------------------------------------------------------------- public API

def validate_endpoint_request(name: str, deployments: Dict[str, str], traffic: Dict[str, int]) -> None:
    """Refuse a bad endpoint definition before any process is started."""
    if not isinstance(name, str) or not NAME_RULE.match(name):
        raise EndpointError(f"endpoint name {name!r} is invalid: 3-32 characters, letters, digits and '-', starting "
                            f"with a letter and not ending with '-' (e.g. ultrachat-completion-1712345678)")
    if not deployments:
        raise EndpointError("an endpoint needs at least one deployment (deployment name -> model URI)")
    for dep, uri in deployments.items():
        if not isinstance(dep, str) or not NAME_RULE.match(dep):
            raise EndpointError(f"deployment name {dep!r} is invalid: 3-32 characters, letters, digits and '-', "
                                f"starting with a letter")
        if not isinstance(uri, str) or not uri:
            raise EndpointError(f"deployment {dep!r}: model URI must be a non-empty string, got {uri!r}")
        if is_local_model_dir(uri) and not (Path(uri) / "config.json").exists():
            raise EndpointError(f"deployment {dep!r}: {uri!r} is neither a model URI (models:/<name>/<version>) nor a "
                                f"save_pretrained folder with a config.json")
    unknown = sorted(set(traffic) - set(deployments))
    if unknown:
        raise EndpointError(f"traffic names deployment(s) {unknown} that are not defined; defined: {sorted(deployments)}")
    for dep, pct in traffic.items():
        if isinstance(pct, bool) or not isinstance(pct, int) or not 0 <= pct <= 100:
            raise EndpointError(f"traffic[{dep!r}] must be an integer percentage 0..100, got {pct!r}")
    total = sum(traffic.values())
    if total not in (0, 100):
        raise EndpointError(f"traffic percentages must add up to 100 (or all be 0), got {total}: {traffic}")


def launch_server(settings: "EndpointSettings", *, state_dir, env: Optional[Dict[str, str]] = None,
                  detach: bool = False) -> Dict[str, Any]:
    """Write the key and the settings file, start the server process and wait until its socket is bound. Not yet
    ready to serve.

    detach=False ties the server to this process: it ends by itself once this process is gone."""
    name, host = settings.name, settings.host
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    paths = _paths(name, state_dir)
    write_text(paths["key"], secrets.token_urlsafe(32), perms=0o600)  # the secret: owner-only, never logged
    paths["port"].unlink(missing_ok=True)
    # only this process knows where its files are and who owns the server: the rest is the caller's object as is
    settings = replace(settings, key="", key_file=str(paths["key"]), port_file=str(paths["port"]),
                       owner_pid=None if detach else os.getpid(), state_file=None if detach else str(paths["state"]))
    settings.write(paths["settings"])
    cmd = [sys.executable, "-m", SERVER_MODULE, "--settings", str(paths["settings"])]
    instance = secrets.token_hex(16)  # who this server is, beyond a pid that can be recycled (_is_our_server)
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", INSTANCE_ENV: instance}
    with open(paths["log"], "ab") as log_file:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                env=child_env, start_new_session=True)
    proc.ftrun_instance = instance
    _children[proc.pid] = proc
    deadline = time.monotonic() + 60
    while not paths["port"].exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _abort(name, proc.pid, state_dir, "the server exited before binding its port" if proc.poll() is not None
                   else "the server did not bind its port within 60 s", instance)
        time.sleep(0.05)
    bound = json.loads(paths["port"].read_text(encoding="utf-8"))
    paths["port"].unlink(missing_ok=True)
    url = f"http://{host}:{bound['port']}"
    return {"name": name, "url": url, "scoring_uri": f"{url}/score", "openai_base_url": f"{url}/v1",
            "pid": proc.pid, "port": bound["port"], "host": host, "key_file": str(paths["key"]),
            "log_file": str(paths["log"]), "deployments": dict(settings.deployments),
            "traffic": dict(settings.traffic), "instance": instance}


def _abort(name: str, pid: int, state_dir, why: str, instance: Optional[str] = None):
    log_path = _paths(name, state_dir)["log"]
    _terminate(pid, name, grace=3.0, instance=instance)
    _remove_files(name, state_dir)
    raise EndpointError(f"endpoint {name!r} failed to start: {why}. Server log ({log_path}), last lines:\n"
                        f"{_log_tail(log_path)}")


def wait_ready(state: Dict[str, Any], *, timeout_s: float = 300, progress: bool = True) -> Dict[str, Any]:
    """Poll /health/ready until 200; raise (after stopping the server) if it dies, fails to load or times out."""
    import httpx

    name, pid, instance = state["name"], state["pid"], state.get("instance")
    state_dir = Path(state["key_file"]).parent
    started = time.monotonic()
    last_note = started
    while True:
        waited = time.monotonic() - started
        if not _is_our_server(pid, name, instance):
            _abort(name, pid, state_dir, "the server process exited while loading", instance)
        try:
            # with the key: without it the probe says only ready / not ready, not why loading failed
            r = httpx.get(f"{state['url']}/health/ready", timeout=2.0,
                          headers={"Authorization": f"Bearer {read_key(state)}"})
            if r.status_code == 200:
                if progress:
                    print(f"  endpoint {name} ready after {waited:.1f}s", flush=True)
                return r.json()
            if r.status_code == 500:
                _abort(name, pid, state_dir, f"loading the model failed: {r.json().get('error')}", instance)
        except httpx.HTTPError:
            pass
        if waited > timeout_s:
            _abort(name, pid, state_dir, f"not ready within startup_timeout_s={timeout_s}", instance)
        if progress and time.monotonic() - last_note >= 5:
            last_note = time.monotonic()
            print(f"  waiting for endpoint {name} to load its model ... {waited:.0f}s", flush=True)
        time.sleep(0.1)


def start_endpoint(settings: "EndpointSettings", *, state_dir, startup_timeout_s: float = 300,
                   env: Optional[Dict[str, str]] = None, detach: bool = False) -> Dict[str, Any]:
    """Start a local endpoint that runs with `settings`, wait until it is ready and write its state file. Returns
    the state (JSON-able).

    detach=True lets it outlive this process; otherwise it stops by itself when this process is gone."""
    name, deployments = settings.name, settings.deployments
    validate_endpoint_request(name, deployments, settings.traffic)
    from runner.local.endpoint.settings import SettingsError

    try:
        settings.checked()  # values in range before anything starts
    except SettingsError as exc:
        raise EndpointError(str(exc)) from None
    from runner.locks import exclusive

    Path(state_dir).mkdir(parents=True, exist_ok=True)
    # The name is checked and claimed (the state file written, status "loading") under one lock: another process
    # starting the same name waits, then finds this server alive and refuses.
    with exclusive(Path(state_dir) / NAMES_LOCK):
        existing = find_endpoint(name, state_dir=state_dir)
        if existing and existing.get("alive"):
            raise EndpointError(f"endpoint {name!r} is already running at {existing['url']}; delete it first with "
                                f"`ftrun steps=[cleanup] endpoint_name={name}`")
        if existing:  # a stale state file from a server that is gone
            _remove_files(name, state_dir)
        print(f"  starting endpoint {name} ({', '.join(f'{d}={u}' for d, u in deployments.items())})", flush=True)
        state = launch_server(settings, state_dir=state_dir, env=env, detach=detach)
        state["detached"] = detach
        write_text(_paths(name, state_dir)["state"], json.dumps({**state, "status": "loading"}, indent=2))
    print(f"  endpoint {name} listening at {state['url']} (pid {state['pid']}); loading the model", flush=True)
    try:
        wait_ready(state, timeout_s=startup_timeout_s)
    except KeyboardInterrupt:
        _terminate(state["pid"], name, grace=3.0, instance=state["instance"])
        _remove_files(name, state_dir)
        raise
    state["started"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    state["status"] = "ready"
    write_text(_paths(name, state_dir)["state"], json.dumps(state, indent=2))
    return state


def find_endpoint(name: str, *, state_dir) -> Optional[Dict[str, Any]]:
    """The state of endpoint `name` (with "alive": whether its server still runs), or None if there is none."""
    path = _paths(name, state_dir)["state"]
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    state["alive"] = _is_our_server(int(state["pid"]), name, state.get("instance"))
    return state


def invoke(state: Dict[str, Any], request: Dict[str, Any], deployment: Optional[str] = None,
           timeout: float = 120.0) -> Dict[str, Any]:
    """POST a scoring request (Azure ML format) to the endpoint, as `az ml online-endpoint invoke` would."""
    import httpx

    headers = {"Authorization": f"Bearer {read_key(state)}", "Content-Type": "application/json"}
    if deployment:
        headers["azureml-model-deployment"] = deployment
    try:
        r = httpx.post(state["scoring_uri"], json=request, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise EndpointError(f"endpoint {state['name']} at {state['scoring_uri']} did not answer: {exc}") from None
    if r.status_code != 200:
        try:
            detail = r.json().get("error", {}).get("message") or r.text
        except ValueError:
            detail = r.text
        raise EndpointError(f"endpoint {state['name']} answered {r.status_code}: {detail}")
    return r.json()


def stop_endpoint(name_or_state: Union[str, Dict[str, Any]], *, state_dir) -> Dict[str, Any]:
    """Delete the endpoint: stop its server, check the port is free, remove key and state files. Idempotent.

    Given the state a deploy returned, only that server is stopped: when the name's state file now belongs to
    another server (another instance token), that server and its files are left alone."""
    if isinstance(name_or_state, dict):
        name = name_or_state["name"]
        state = find_endpoint(name, state_dir=state_dir)
        mine = name_or_state.get("instance")
        if state is not None and mine is not None and state.get("instance") != mine:
            how = _terminate(int(name_or_state["pid"]), name, instance=mine)
            return {"deleted": True, "name": name, "port": None, "how": how,
                    "note": f"the state files of {name!r} belong to another server (pid {state['pid']}): left alone"}
        state = state or name_or_state
    else:
        name = name_or_state
        state = find_endpoint(name, state_dir=state_dir)
    if state is None:
        _remove_files(name, state_dir)
        return {"deleted": True, "name": name, "port": None, "how": "no such endpoint (already deleted)"}
    how = _terminate(int(state["pid"]), name, instance=state.get("instance"))
    host, port = state.get("host", "127.0.0.1"), int(state["port"])
    end = time.monotonic() + 5
    # a server that was not running any more may have left its port to someone else: nothing to wait for then
    while how != "not running" and _listening(host, port):
        if time.monotonic() > end:
            raise EndpointError(f"endpoint {name}: port {port} still accepts connections after stopping pid "
                                f"{state['pid']}; the state file {_paths(name, state_dir)['state']} is kept")
        time.sleep(0.1)
    _remove_files(name, state_dir)
    return {"deleted": True, "name": name, "port": port, "how": how,
            "deleted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def serve_until_interrupted(state: Dict[str, Any], *, state_dir=None, poll_s: float = 1.0) -> Dict[str, Any]:
    """deployment.keep_alive=true: keep serving until Ctrl-C (or the server exits), then delete the endpoint.

    SIGINT, SIGTERM and SIGHUP all end the wait (KeyboardInterrupt("SIGTERM") ...), with this function's own
    handlers (runner/signals.py), so it also stops when started with SIGINT ignored (a background job); the
    previous handlers are back when it returns. A repeated signal does not cut the deletion short."""
    from runner.signals import stop_raises_interrupt

    state_dir = state_dir or Path(state["key_file"]).parent
    with stop_raises_interrupt():
        try:  # the notice is inside the try: a Ctrl-C right after it must still delete the endpoint
            print(f"endpoint {state['name']} serving at {state['url']} (OpenAI base URL {state['url']}/v1); "
                  f"key in {state['key_file']}. Ctrl-C to delete it.", flush=True)
            while _is_our_server(int(state["pid"]), state["name"], state.get("instance")):
                time.sleep(poll_s)
            ended_by = "server exited"
            print(f"endpoint {state['name']}: the server exited on its own", flush=True)
        except KeyboardInterrupt as exc:
            ended_by = str(exc) or "Ctrl-C"
            print(f"\n{ended_by}: deleting endpoint {state['name']}", flush=True)
        return {**stop_endpoint(state, state_dir=state_dir), "ended_by": ended_by}
