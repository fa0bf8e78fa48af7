"""register: the fine-tuned model, versioned, with lineage to the job, the base model and the data."""

from dataclasses import dataclass
from typing import Optional

from runner.steps.result import StepResult


@dataclass
class RegisterResult(StepResult):
    model_uri: Optional[str] = None
    name: Optional[str] = None
    version: Optional[str] = None


def run(ctx, backend) -> RegisterResult:
    return RegisterResult.from_outputs(backend.register(ctx))
