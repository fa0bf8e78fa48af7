"""compute: the device or cluster, and the checks that it can run this fine-tune (allow lists, GPUs, memory)."""

from dataclasses import dataclass
from typing import Optional

from runner.steps.result import StepResult


@dataclass
class ComputeResult(StepResult):
    gpus_per_node: Optional[int] = None


def run(ctx, backend) -> ComputeResult:
    return ComputeResult.from_outputs(backend.compute(ctx))
