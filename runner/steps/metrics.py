"""metrics: the training and evaluation curves as a table and a PNG (MLflow here; the workspace's MLflow on Azure)."""

from dataclasses import dataclass, field
from typing import Dict, Optional

from runner.steps.result import StepResult


@dataclass
class MetricsResult(StepResult):
    final: Dict[str, float] = field(default_factory=dict)  # metric → its last value
    plot: Optional[str] = None
    json: Optional[str] = None


def run(ctx, backend) -> MetricsResult:
    return MetricsResult.from_outputs(backend.metrics(ctx))
