"""connect: reach the place the work happens (the state folder and MLflow store here; the workspace and the
registry on Azure) and check what can be checked before anything is spent."""

from dataclasses import dataclass

from runner.steps.result import StepResult


@dataclass
class ConnectResult(StepResult):
    pass


def run(ctx, backend) -> ConnectResult:
    return ConnectResult.from_outputs(backend.connect(ctx))
