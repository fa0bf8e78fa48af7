"""The run record: a machine-readable account of every step's outputs (ids, paths, timings), saved atomically.

`<run dir>/run_record.json` is rewritten after every step, so a crash leaves the record of what finished. A later
run can pick up an earlier one's outputs by reference (`from_run=<run dir>`), e.g. `steps=[deploy]` finds the
model registered by a previous run.
"""

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from runner.atomic import write_json
from runner.liveness import alive, this_process

RECORD_FILE = "run_record.json"
# <state root>/runs/: one small file per run in progress ({"run_dir", "host", "pid", "pid_started"}), removed when
# the run ends; what a killed run leaves there is how the next run finds its record (runner/reaper.py)
LIVE_RUNS_DIR = "runs"


def load_record(run_dir) -> Dict[str, Any]:
    """A run's record; one left `running` by a process that is gone is marked `died` first (see settle)."""
    path = Path(run_dir) / RECORD_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {RECORD_FILE} in {run_dir}: is it a run directory of ftrun?")
    return settle(path, json.loads(path.read_text(encoding="utf-8")))


def settle(path: Path, data: Dict[str, Any]) -> Dict[str, Any]:
    """A record says `running` while its process lives. One whose process is dead (SIGKILL, power loss: nothing
    could close it) is rewritten as `died`, with its unfinished steps `died` too, so nobody waits on it or
    mistakes it for a run in progress. A record from another host, or without a pid (older), is left as it is."""
    owner = data.get("owner") or {}
    if data.get("status") != "running" or alive(owner) is not False:
        return data
    message = (f"the process (pid {owner.get('pid')} on {owner.get('host')}) ended without closing this record "
               "(killed?)")
    for entry in data.get("steps", {}).values():
        if entry.get("status") == "running":
            entry["status"] = "died"
    data.update(status="died", error={"step": _last_step(data), "message": message},
                died_noticed=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    try:
        write_json(path, data)
    except OSError:  # a run dir this user cannot write: it reads as died all the same
        pass
    return data


def _last_step(data: Dict[str, Any]) -> Optional[str]:
    steps = list(data.get("steps", {}))
    return steps[-1] if steps else None


def live_run_entries(state_root) -> List[Path]:
    folder = Path(state_root) / LIVE_RUNS_DIR
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


class RunRecord:
    def __init__(self, run_dir, *, backend: str, config_sha256: str, earlier: Optional[Dict[str, Any]] = None):
        self.path = Path(run_dir) / RECORD_FILE
        self.earlier = earlier or {}
        self.data: Dict[str, Any] = {
            "run_dir": str(Path(run_dir).resolve()),
            "backend": backend,
            "config_sha256": config_sha256,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "status": "running",
            "owner": this_process(),  # who keeps this record up to date: `running` is true only while it lives
            "from_run": self.earlier.get("run_dir"),
            "steps": {},
        }
        self.live_entry: Optional[Path] = None

    # ---- reading ---------------------------------------------------------------------------------------------
    def output(self, step: str, key: Optional[str] = None, default: Any = None) -> Any:
        """An earlier step's outputs: this run's first, then the `from_run` record's."""
        for source in (self.data["steps"], self.earlier.get("steps", {})):
            entry = source.get(step)
            if entry and entry.get("status") == "ok":
                outputs = entry.get("outputs", {})
                return outputs if key is None else outputs.get(key, default)
        return {} if key is None and default is None else default

    def status(self, step: str) -> Optional[str]:
        entry = self.data["steps"].get(step)
        return entry.get("status") if entry else None

    # ---- writing ---------------------------------------------------------------------------------------------
    def track(self, state_root) -> None:
        """List this run under <state root>/runs/ until it ends, so a later run finds it if it is killed."""
        key = hashlib.sha256(self.data["run_dir"].encode()).hexdigest()[:16]
        self.live_entry = Path(state_root) / LIVE_RUNS_DIR / f"{key}.json"
        write_json(self.live_entry, {"run_dir": self.data["run_dir"], **self.data["owner"]})

    def _untrack(self) -> None:
        if self.live_entry is not None:
            self.live_entry.unlink(missing_ok=True)

    def start(self, step: str) -> None:
        self.data["steps"][step] = {"status": "running", "started": time.time()}
        self.save()

    def finish(self, step: str, outputs: Dict[str, Any]) -> None:
        entry = self.data["steps"][step]
        entry.update(status="ok", seconds=round(time.time() - entry["started"], 3), outputs=outputs or {})
        self.save()

    def note(self, step: str, **values: Any) -> None:
        """Facts a running step must not lose if it is cut short (a submitted job's name, what a refusal was
        based on): kept in the step's entry beside its status, saved at once; `fail` keeps them."""
        self.data["steps"].setdefault(step, {"status": "running", "started": time.time()}).update(values)
        self.save()

    def noted(self, step: str, key: str) -> Any:
        """A value `note`d by this run's step, else by the from_run record's (whatever their status)."""
        for source in (self.data["steps"], self.earlier.get("steps", {})):
            value = (source.get(step) or {}).get(key)
            if value is not None:
                return value
        return None

    def fail(self, step: str, error: BaseException) -> None:
        """The step ended with `error`: `failed`, or the status the error names (`refused`: a gate said no, and
        the entry's `reason` says why)."""
        entry = self.data["steps"].setdefault(step, {"started": time.time()})
        status = getattr(error, "step_status", "failed")
        if status != "failed":
            entry["reason"] = str(error)
        entry.update(
            status=status,
            seconds=round(time.time() - entry["started"], 3),
            error=f"{type(error).__name__}: {error}",
        )
        self.data["status"] = "failed"
        self.data["error"] = {"step": step, "message": f"{type(error).__name__}: {error}"}
        self.save()
        self._untrack()

    def close(self, status: str = "ok") -> None:
        if self.data["status"] == "running":
            self.data["status"] = status
        self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.save()
        self._untrack()

    def save(self) -> None:
        write_json(self.path, self.data)

    def metric(self, name: str) -> Optional[float]:
        """A final figure of the run (see final_figure)."""
        return final_figure({"steps": {**self.earlier.get("steps", {}), **self.data["steps"]}}, name)

    def objective(self, name: str = "eval_loss") -> Optional[float]:
        """The sweep metric, returned by the Hydra task so that optimising sweepers (Optuna) can read it."""
        return self.metric(name)


def final_figure(record: Dict[str, Any], name: str) -> Optional[float]:
    """A final figure of a run from its record: the finetune step's result (the local trainer measures it), else
    the metrics step's table (Azure: read from the workspace's MLflow after the job), else the fine-tuned model's
    score in the evaluate step's result (`rouge_l`, `loss`, ...: what `sweep.metric` may name)."""
    import math

    def outputs(step: str) -> Optional[Dict[str, Any]]:  # a step's recorded result, flat, when it ran ok
        entry = (record.get("steps") or {}).get(step) or {}
        return entry.get("outputs") or {} if entry.get("status") == "ok" else None

    finetune, metrics, evaluate = outputs("finetune"), outputs("metrics"), outputs("evaluate")
    value = finetune.get(name) if finetune is not None else None
    if value is None and metrics is not None:
        value = (metrics.get("final") or {}).get(name)
    if value is None and evaluate is not None:  # an evaluate metric: the fine-tuned model's score (rouge_l, ...)
        value = ((evaluate.get("figures") or {}).get(name) or {}).get("ft")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)
