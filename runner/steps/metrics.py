"""metrics: the training and evaluation curves as a table and a PNG (MLflow here; the workspace's MLflow on Azure)."""

from typing import Any, Dict, Protocol

from runner.step_results import MetricsResult


class MetricsActions(Protocol):
    """What the metrics step asks of a backend."""

    def metrics(self, ctx) -> Dict[str, Any]: ...


def run(ctx, backend: MetricsActions) -> MetricsResult:
    return MetricsResult.from_outputs(backend.metrics(ctx))
