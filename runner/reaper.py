"""What dead processes left behind in the state root, found and settled at the start of the next run and by the
cleanup step: run records still saying `running` (marked `died`, see runner/record.settle) and the register step's
staging folders (removed, see runner/staging.py). Only this host's dead processes count:
a live run's record and staging folder are never touched."""

import json
from pathlib import Path
from typing import Any, Callable, Dict, List

from runner.liveness import alive
from runner.record import live_run_entries, load_record
from runner.staging import remove_dead_staging


def reap(state_root, artifact_root=None, say: Callable[[str], None] = print) -> Dict[str, List[str]]:
    """{"died_runs": run dirs marked died, "removed_staging": staging folders removed}."""
    died: List[str] = []
    for entry in live_run_entries(state_root):
        try:
            info: Dict[str, Any] = json.loads(entry.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # being written, or already gone
        try:
            status = load_record(info["run_dir"]).get("status")  # settles a dead owner's record as `died`
        except (FileNotFoundError, KeyError, ValueError):
            status = None if alive(info) is False else "running"  # no record to show: only the entry to drop
        if status == "died":
            died.append(info["run_dir"])
            say(f"    run {info['run_dir']} was left `running` by pid {info.get('pid')} on {info.get('host')}, "
                "which is gone: its record now says `died`")
        if status != "running":
            entry.unlink(missing_ok=True)
    removed: List[str] = []
    if artifact_root and Path(artifact_root).is_dir():
        removed = remove_dead_staging(artifact_root)
        for folder in removed:
            say(f"    removed {folder}: the staging folder of a register that was killed")
    return {"died_runs": died, "removed_staging": removed}
