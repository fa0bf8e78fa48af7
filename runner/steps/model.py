"""model: the foundation model (a local folder, the offline tiny model, or the registry's asset) and its facts.
Once they are known, the run's effective fine-tune parameters are decided, once (runner/finetune_params.py)."""

from typing import Any, Dict, Protocol

from runner.finetune_params import EffectiveFinetuneParams
from runner.step_results import ModelResult


class ModelActions(Protocol):
    """What the model step asks of a backend."""

    def model(self, ctx) -> Dict[str, Any]: ...

    def finetune_params(self, ctx) -> EffectiveFinetuneParams: ...


def run(ctx, backend: ModelActions) -> ModelResult:
    result = ModelResult.from_outputs(backend.model(ctx))
    backend.finetune_params(ctx)  # the model's defaults are known now: the one merge of this run
    return result
