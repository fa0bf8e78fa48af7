"""cleanup: delete the endpoint (and, if asked, the cluster) so nothing is left running or billing; and settle what
killed runs left in the state root (records marked `died`, register staging folders removed: runner/reaper.py).
`ftrun steps=[cleanup]` alone does the latter: every run settles them at its start, and this step reports them."""

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Protocol

from runner.step_results import StepResult


@dataclass
class CleanupResult(StepResult):
    STEP: ClassVar[str] = "cleanup"
    deleted: Optional[Any] = None  # local: True; azureml: the endpoint's name
    died_runs: List[str] = field(default_factory=list)  # run dirs whose record a dead process had left `running`
    removed_staging: List[str] = field(default_factory=list)


class CleanupActions(Protocol):
    """What the cleanup step asks of a backend."""

    def has_endpoint(self, ctx) -> bool: ...

    def cleanup(self, ctx) -> Dict[str, Any]: ...


def run(ctx, backend: CleanupActions) -> CleanupResult:
    from runner.reaper import reap

    found = reap(ctx.cfg.paths.root, ctx.cfg.mlflow.artifact_location, say=ctx.say)
    at_start = ctx.record.data.get("reaped") or {}
    if not backend.has_endpoint(ctx):
        ctx.say("no endpoint to delete (endpoint_name=NAME deletes one an earlier run left running)")
        result = CleanupResult()
    else:
        result = CleanupResult.from_outputs(backend.cleanup(ctx))
    result.died_runs = at_start.get("died_runs", []) + found["died_runs"]
    result.removed_staging = at_start.get("removed_staging", []) + found["removed_staging"]
    return result
