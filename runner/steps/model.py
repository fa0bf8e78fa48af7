"""model: the foundation model (a local folder, the offline tiny model, or the registry's asset) and its facts."""

from dataclasses import dataclass
from typing import Any, Dict, Optional, Protocol

from runner.steps.result import StepResult


@dataclass
class ModelResult(StepResult):
    name: Optional[str] = None
    model_dir: Optional[str] = None  # local: the folder the trainer loads
    model_id: Optional[str] = None  # azureml: the registry asset id the pipeline gets


class ModelActions(Protocol):
    """What the model step asks of a backend."""

    def model(self, ctx) -> Dict[str, Any]: ...


def run(ctx, backend: ModelActions) -> ModelResult:
    return ModelResult.from_outputs(backend.model(ctx))
