"""connect: reach the place the work happens (the state folder and MLflow store here; the workspace and the
registry on Azure) and check what can be checked before anything is spent."""

from typing import Any, Dict, Protocol

from runner.step_results import ConnectResult


class ConnectActions(Protocol):
    """What the connect step asks of a backend."""

    def connect(self, ctx) -> Dict[str, Any]: ...


def run(ctx, backend: ConnectActions) -> ConnectResult:
    return ConnectResult.from_outputs(backend.connect(ctx))
