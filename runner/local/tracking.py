"""MLflow tracking for the local backend, always through an MlflowClient bound to an explicit URI.

The global `mlflow.set_tracking_uri` is never touched: a test session (or a sweep) may talk to several stores in
one process, and a library that flips process-wide state would send one run's metrics into another's store.

Runs that share a state root share its SQLite store. MLflow creates and migrates the tables on the first use of a
store in each process, and two processes doing that at once on a fresh file die in alembic ("duplicate column"):
so the first use in a process, and the other writes that race (a new experiment, a new registered model and its
version), happen under an exclusive lock on `<store file>.lock` beside the database (runner/locks.py). Every
other access relies on SQLite's own locking with MLflow's busy timeout (20 s per session).
"""

import json
import logging
import numbers
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

from runner.local.store import check_store, sqlite_file, store_lock

log = logging.getLogger(__name__)

# MLflow's limits (mlflow.utils.validation): longer values are refused by the store, not truncated.
MAX_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /]")  # MLflow keys: alphanumerics, _ - . space /


_ready_stores: set = set()
artifact_roots: Dict[str, str] = {}  # tracking URI -> its runs' artifact folder (the store check's evidence)  # tracking URIs whose tables this process has seen created (under the store lock)


def mlflow_client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    from runner.quiet import quiet_mlflow

    quiet_mlflow()

    if tracking_uri in _ready_stores:
        return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    # MLflow builds (and migrates) a store's tables the first time a process uses it (the client's constructor
    # does it for the tracking tables, the first registry call for the registry's): done here under the lock, so
    # no two processes run the migrations at once.
    with store_lock(tracking_uri):
        db = sqlite_file(tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
            # checked (and a missing one built aside) before MLflow may create or migrate anything in place
            check_store(tracking_uri, artifact_roots.get(tracking_uri, str(db.parent / "mlartifacts")))
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
    _ready_stores.add(tracking_uri)
    return client


def _key(name: Any) -> str:
    return _BAD_KEY_CHARS.sub("_", str(name))[:MAX_KEY]


def clipped_text(value: Any, limit: int) -> str:
    if isinstance(value, str):
        text = value
    elif value is None or isinstance(value, (bool, int, float)):
        text = str(value)
    else:  # lists / dicts as JSON, so the UI shows ["a", "b"] rather than a Python repr
        text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def flatten(params: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: Dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _artifact_uri(location: str) -> str:
    """A plain folder becomes an absolute file URI; anything with a scheme (s3://, wasbs://, file:) is kept."""
    if re.match(r"^[A-Za-z][\w+.-]*:", location) and not re.match(r"^[A-Za-z]:[\\/]", location):
        return location
    return Path(location).expanduser().resolve().as_uri()


def ensure_experiment(client, experiment_name: str, artifact_location: Optional[str]) -> str:
    """The experiment's id, creating it with `artifact_location` (or restoring it from the bin) when needed.
    Without an explicit location a SQLite store would put artifacts in ./mlruns of whatever the CWD is."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        try:
            return client.create_experiment(
                experiment_name, artifact_location=_artifact_uri(artifact_location) if artifact_location else None)
        except MlflowException as err:  # another process created it between our get and create
            exp = client.get_experiment_by_name(experiment_name)
            if exp is None:
                raise err
    if artifact_location and exp.artifact_location != _artifact_uri(artifact_location):
        log.warning("MLflow experiment %r already stores its artifacts in %s (not %s): an experiment's artifact "
                    "location is fixed when it is created", experiment_name, exp.artifact_location,
                    _artifact_uri(artifact_location))
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def start_run(*, tracking_uri: str, experiment_name: str, artifact_location: Optional[str], run_name: str,
              params: Mapping[str, Any], tags: Mapping[str, Any]) -> str:
    """A new RUNNING run with the params (flattened, stringified, truncated to MLflow's limits) and tags."""
    from mlflow.entities import Param

    client = mlflow_client(tracking_uri)
    with store_lock(tracking_uri):  # two runs creating the experiment at once: one creates, the other finds it
        exp_id = ensure_experiment(client, experiment_name, artifact_location)
    run_tags = {_key(k): clipped_text(v, MAX_TAG_VALUE) for k, v in tags.items()}
    run = client.create_run(exp_id, run_name=run_name, tags=run_tags)
    entries = [Param(_key(k), clipped_text(v, MAX_PARAM_VALUE)) for k, v in flatten(params).items()]
    for i in range(0, len(entries), PARAMS_PER_BATCH):
        client.log_batch(run.info.run_id, params=entries[i: i + PARAMS_PER_BATCH])
    return run.info.run_id


def _number(value: Any) -> Optional[float]:
    """A float for real numbers (python, numpy, 0-d tensors); None for bools, strings, containers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 1) == 0:
        try:
            return _number(item())
        except (TypeError, ValueError, RuntimeError):
            return None
    return None


def metric_logger(tracking_uri: str, run_id: str) -> Callable[[Dict[str, Any], int], None]:
    """log_fn(metrics, step) for the trainer: one log_batch per call, numeric values only. A tracking hiccup
    (a locked SQLite file, a store restart) is retried once and then only logged: it must never kill training."""
    from mlflow.entities import Metric

    client = mlflow_client(tracking_uri)
    failures = {"n": 0}

    def log_fn(metrics: Dict[str, Any], step: int) -> None:
        now = int(time.time() * 1000)
        entries = []
        for name, value in metrics.items():
            number = _number(value)
            if number is not None:
                entries.append(Metric(_key(name), number, now, int(step)))
        for i in range(0, len(entries), METRICS_PER_BATCH):
            chunk = entries[i: i + METRICS_PER_BATCH]
            for attempt in (1, 2):
                try:
                    client.log_batch(run_id, metrics=chunk)
                    break
                except Exception as err:  # noqa: BLE001 - tracking must not stop training
                    if attempt == 2:
                        failures["n"] += 1
                        log.warning("MLflow metric logging failed at step %s (%d failure(s) so far): %s",
                                    step, failures["n"], err)
                    else:
                        time.sleep(0.2)

    log_fn.failures = failures  # type: ignore[attr-defined]  # for callers/tests that want to know
    return log_fn


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"run status {status!r} must be FINISHED, FAILED or KILLED")
    mlflow_client(tracking_uri).set_terminated(run_id, status=status)


def log_artifact(tracking_uri: str, run_id: str, path: str, artifact_path: Optional[str] = None) -> None:
    """A file, or a folder's contents, into the run's artifacts."""
    client = mlflow_client(tracking_uri)
    if Path(path).is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def metric_history(tracking_uri: str, run_id: str) -> Dict[str, List[List[float]]]:
    """metric -> [[step, value], ...] sorted by step. A step logged twice (a resumed run repeats the steps after
    its last checkpoint) keeps its latest value, so curves do not zigzag."""
    client = mlflow_client(tracking_uri)
    history: Dict[str, List[List[float]]] = {}
    for name in sorted(client.get_run(run_id).data.metrics):
        by_step: Dict[int, tuple] = {}
        for m in client.get_metric_history(run_id, name):
            if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
                by_step[m.step] = (m.timestamp, m.value)
        history[name] = [[step, by_step[step][1]] for step in sorted(by_step)]
    return history


def find_run(tracking_uri: str, experiment_name: str, tags: Mapping[str, Any]) -> Optional[str]:
    """The newest live run of the experiment carrying all these tag values, or None."""
    client = mlflow_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        return None
    wanted = {_key(k): clipped_text(v, MAX_TAG_VALUE) for k, v in tags.items()}
    # Filter in the store on the values it can quote safely; check every tag again below.
    clauses = [f"tags.`{k}` = '{v}'" for k, v in wanted.items() if "'" not in v and "`" not in k]
    token = None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string=" and ".join(clauses),
                                  order_by=["attributes.start_time DESC"], max_results=500, page_token=token)
        for run in page:
            if all(run.data.tags.get(k) == v for k, v in wanted.items()):
                return run.info.run_id
        token = page.token
        if not token:
            return None
