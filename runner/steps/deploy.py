"""deploy: the registered model behind an online endpoint (key auth, traffic split)."""

from dataclasses import dataclass
from typing import Any, Dict, Optional, Protocol

from runner.steps.result import StepResult


@dataclass
class DeployResult(StepResult):
    scoring_uri: Optional[str] = None


class DeployActions(Protocol):
    """What the deploy step asks of a backend."""

    def deploy(self, ctx) -> Dict[str, Any]: ...


def run(ctx, backend: DeployActions) -> DeployResult:
    return DeployResult.from_outputs(backend.deploy(ctx))
