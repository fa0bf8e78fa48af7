"""deploy: the registered model behind an online endpoint (key auth, traffic split)."""

from typing import Any, Dict, Protocol

from runner.step_results import DeployResult


class DeployActions(Protocol):
    """What the deploy step asks of a backend."""

    def deploy(self, ctx) -> Dict[str, Any]: ...


def run(ctx, backend: DeployActions) -> DeployResult:
    return DeployResult.from_outputs(backend.deploy(ctx))
