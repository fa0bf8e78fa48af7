"""test: one seeded row of the sample split, as the Azure ML scoring request, sent to the endpoint; the reply."""

from dataclasses import dataclass
from typing import Any, Dict, Optional, Protocol

from runner.atomic import write_json
from runner.data.sample_request import sample_request
from runner.steps.result import StepResult

REQUEST_FILE = "sample_score.json"


@dataclass
class TestResult(StepResult):
    __test__ = False  # not a pytest test class, whatever its name
    reply: Optional[str] = None
    request_file: Optional[str] = None


class TestActions(Protocol):
    """What the test step asks of a backend."""

    def test(self, ctx, request_file) -> Dict[str, Any]: ...


def run(ctx, backend: TestActions) -> TestResult:
    request_file = ctx.run_dir / REQUEST_FILE
    write_json(request_file, sample_request(ctx.cfg, ctx.record.output("data", "sample_file")))
    outputs = backend.test(ctx, request_file)
    outputs["request_file"] = str(request_file)
    return TestResult.from_outputs(outputs)
