"""deploy: the registered model behind an online endpoint (key auth, traffic split)."""

from dataclasses import dataclass
from typing import Optional

from runner.steps.result import StepResult


@dataclass
class DeployResult(StepResult):
    scoring_uri: Optional[str] = None


def run(ctx, backend) -> DeployResult:
    return DeployResult.from_outputs(backend.deploy(ctx))
