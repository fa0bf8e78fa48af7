"""cleanup: delete the endpoint (and, if asked, the cluster) so nothing is left running or billing."""

from dataclasses import dataclass
from typing import Any, Optional

from runner.steps.result import StepResult


@dataclass
class CleanupResult(StepResult):
    deleted: Optional[Any] = None  # local: True; azureml: the endpoint's name


def run(ctx, backend) -> CleanupResult:
    return CleanupResult.from_outputs(backend.cleanup(ctx))
