"""compute: the device or cluster, and the checks that it can run this fine-tune (allow lists, GPUs, memory)."""

from dataclasses import dataclass
from typing import Any, Dict, Optional, Protocol

from runner.steps.result import StepResult


@dataclass
class ComputeResult(StepResult):
    gpus_per_node: Optional[int] = None


class ComputeActions(Protocol):
    """What the compute step asks of a backend."""

    def compute(self, ctx) -> Dict[str, Any]: ...


def run(ctx, backend: ComputeActions) -> ComputeResult:
    return ComputeResult.from_outputs(backend.compute(ctx))
