"""metrics: the training and evaluation curves as a table and a PNG (MLflow here; the workspace's MLflow on Azure)."""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Protocol

from runner.steps.result import StepResult


@dataclass
class MetricsResult(StepResult):
    final: Dict[str, float] = field(default_factory=dict)  # metric → its last value
    plot: Optional[str] = None
    json: Optional[str] = None


class MetricsActions(Protocol):
    """What the metrics step asks of a backend."""

    def metrics(self, ctx) -> Dict[str, Any]: ...


def run(ctx, backend: MetricsActions) -> MetricsResult:
    return MetricsResult.from_outputs(backend.metrics(ctx))
