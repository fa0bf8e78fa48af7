"""What one endpoint server runs with, in one typed object: built once from the deployment config, written by the
manager as `<state_dir>/<name>.settings.json`, and read back by the server process (`--settings FILE`).

The key itself is never in the file: the file names `key_file` (0600, written by the manager) and `from_file`
reads the key from it, once. A file that is not what this object is (an unknown key, a wrong type, a missing
required key, a value out of range) is refused with a `SettingsError` naming the key.
"""

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from runner.atomic import write_text
from runner.local.endpoint.limits import DEFAULT_LIMITS, MAX_REQUEST_BYTES, RequestLimits

DEVICES = ("auto", "cpu", "cuda")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
POSITIVE = ("request_timeout_ms", "max_batch_size", "max_request_bytes", "header_timeout_s", "body_timeout_s",
            "keep_alive_timeout_s", "max_connections")
# deployment.* keys that are settings of the same name (the request limits come from theirs: RequestLimits)
FROM_DEPLOYMENT = ("host", "port", "device", "request_timeout_ms", "max_batch_size", "batch_window_ms",
                   "max_request_bytes", "header_timeout_s", "body_timeout_s", "keep_alive_timeout_s", "max_connections")
REQUIRED_IN_FILE = ("name", "deployments", "traffic", "key_file")  # a server cannot run without any of these


class SettingsError(ValueError):
    """An endpoint settings file (or object) that the server cannot run with; the message names the key."""


@dataclass
class EndpointSettings:
    name: str
    deployments: Dict[str, str]  # deployment name -> model URI or save_pretrained folder
    traffic: Dict[str, int]  # deployment name -> percent
    # the secret: read from key_file by from_file, never written to the settings file, never shown by repr
    key: str = field(default="", repr=False, compare=False)
    key_file: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free port, written to port_file
    port_file: Optional[str] = None  # where the server writes {port, pid} once its socket is bound
    owner_pid: Optional[int] = None  # end (removing the key, state and settings files) when it is gone; None = detached
    state_file: Optional[str] = None  # the manager's state file, removed with the key when the owner is gone
    log_level: str = "info"
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

    @classmethod
    def from_deployment(cls, dep, *, name: str, deployments: Dict[str, str]) -> "EndpointSettings":
        """From the config's deployment group (the deployment.* keys of the same names); the rest keep the
        server's defaults, and the manager adds the paths of its own files."""
        limits = RequestLimits(**{f.name: getattr(dep, f.name) for f in dataclasses.fields(RequestLimits)})
        return cls(name=name, deployments=dict(deployments), traffic={k: int(v) for k, v in dep.traffic.items()},
                   limits=limits, **{k: getattr(dep, k) for k in FROM_DEPLOYMENT}).checked()

    def to_json(self) -> Dict[str, Any]:
        """Everything but the key (see `key_file`), JSON-able."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "key"}
        data["limits"] = dataclasses.asdict(self.limits)
        return data

    def write(self, path) -> Path:
        """Whole or absent (runner/atomic.py): a server never reads half a settings file."""
        return write_text(Path(path), json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def from_json(cls, data: Any, *, source: str = "endpoint settings") -> "EndpointSettings":
        """Checked field by field; a SettingsError names the first key that is wrong."""
        if not isinstance(data, dict):
            raise SettingsError(f"{source}: expected a JSON object, got {type(data).__name__}")
        if "key" in data:
            raise SettingsError(f"{source}: 'key' must not be in a settings file; name the file holding it "
                                f"in 'key_file'")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "key"}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise SettingsError(f"{source}: unknown key(s) {unknown}; known: {sorted(fields)}")
        missing = [k for k in REQUIRED_IN_FILE if data.get(k) is None]
        if missing:
            raise SettingsError(f"{source}: missing required key(s) {missing}")
        values = {k: _typed(k, v, fields[k].type, source) for k, v in data.items() if k != "limits"}
        if "limits" in data:
            values["limits"] = _limits(data["limits"], source)
        return cls(**values).checked(source)

    @classmethod
    def from_file(cls, path) -> "EndpointSettings":
        """The settings the manager wrote, checked, with the key read (once) from their key_file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SettingsError(f"endpoint settings file {path} does not exist") from None
        except (OSError, ValueError) as exc:
            raise SettingsError(f"endpoint settings file {path} cannot be read as JSON: {exc}") from None
        settings = cls.from_json(data, source=f"endpoint settings {path}")
        try:
            settings.key = Path(settings.key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SettingsError(f"endpoint settings {path}: key_file {settings.key_file} cannot be read: "
                                f"{exc.strerror}") from None
        if not settings.key:
            raise SettingsError(f"endpoint settings {path}: key_file {settings.key_file} is empty")
        return settings

    def checked(self, source: str = "endpoint settings") -> "EndpointSettings":
        """Values in range (types are the caller's or from_json's job); returns self."""
        for name in POSITIVE:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                raise SettingsError(f"{source}: deployment.{name} must be > 0, got {value!r}")
        if self.device not in DEVICES:
            raise SettingsError(f"{source}: device must be one of {list(DEVICES)}, got {self.device!r}")
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(f"{source}: log_level must be one of {list(LOG_LEVELS)}, got {self.log_level!r}")
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"{source}: port must be 0..65535 (0 = a free one), got {self.port}")
        for name in ("batch_window_ms", "shutdown_grace_s", "load_delay_s"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{source}: {name} must be >= 0, got {getattr(self, name)}")
        return self


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _typed(key: str, value: Any, hint, source: str) -> Any:
    """`value` as the field's type (an int is a fine float), or a SettingsError naming `key`."""
    optional = getattr(hint, "__origin__", None) is not None and type(None) in getattr(hint, "__args__", ())
    if optional:
        if value is None:
            return None
        hint = next(a for a in hint.__args__ if a is not type(None))
    if getattr(hint, "__origin__", None) is dict:
        if not isinstance(value, dict):
            raise SettingsError(f"{source}: {key} must be a JSON object, got {json.dumps(value)}")
        return {str(k): _typed(f"{key}.{k}", v, hint.__args__[1], source) for k, v in value.items()}
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise SettingsError(f"{source}: {key} must be a finite number, got {value}")
        return float(value)
    if isinstance(value, hint) and not (isinstance(value, bool) and hint is not bool):
        return value
    raise SettingsError(f"{source}: {key} must be {'null or ' if optional else ''}{_type_name(hint)}, "
                        f"got {json.dumps(value)}")


def _limits(value: Any, source: str) -> RequestLimits:
    if not isinstance(value, dict):
        raise SettingsError(f"{source}: limits must be a JSON object, got {json.dumps(value)}")
    known = {f.name: f.type for f in dataclasses.fields(RequestLimits)}
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise SettingsError(f"{source}: unknown key(s) {[f'limits.{k}' for k in unknown]}; known: "
                            f"{[f'limits.{k}' for k in known]}")
    typed = {k: _typed(f"limits.{k}", v, known[k], source) for k, v in value.items()}
    try:
        return RequestLimits(**typed)
    except ValueError as exc:  # its own range checks name the deployment.* key
        raise SettingsError(f"{source}: {exc}") from None
