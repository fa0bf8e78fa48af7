"""model: the foundation model (a local folder, the offline tiny model, or the registry's asset) and its facts."""

from dataclasses import dataclass
from typing import Optional

from runner.steps.result import StepResult


@dataclass
class ModelResult(StepResult):
    name: Optional[str] = None
    model_dir: Optional[str] = None  # local: the folder the trainer loads
    model_id: Optional[str] = None  # azureml: the registry asset id the pipeline gets


def run(ctx, backend) -> ModelResult:
    return ModelResult.from_outputs(backend.model(ctx))
