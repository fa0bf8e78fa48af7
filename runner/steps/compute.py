"""compute: the device or cluster, and the checks that it can run this fine-tune (allow lists, GPUs, memory)."""

from typing import Any, Dict, Protocol

from runner.step_results import ComputeResult


class ComputeActions(Protocol):
    """What the compute step asks of a backend."""

    def compute(self, ctx) -> Dict[str, Any]: ...


def run(ctx, backend: ComputeActions) -> ComputeResult:
    return ComputeResult.from_outputs(backend.compute(ctx))
