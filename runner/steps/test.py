"""test: one seeded row of the sample split, as the Azure ML scoring request, sent to the endpoint; the reply."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import OmegaConf

from runner.atomic import write_json
from runner.steps.result import StepResult

REQUEST_FILE = "sample_score.json"
# The sample request of a dry run when the sample split is not on disk (a dry run downloads nothing).
EXAMPLE_CONVERSATION = [
    {"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."},
]


@dataclass
class TestResult(StepResult):
    __test__ = False  # not a pytest test class, whatever its name
    reply: Optional[str] = None
    request_file: Optional[str] = None


def sample_file(ctx) -> Path:
    """The split whose seeded random row becomes the sample request (the data step's file, else where it goes)."""
    recorded = ctx.record.output("data", "sample_file")
    if recorded:
        return Path(recorded)
    return Path(ctx.cfg.dataset.download_dir) / f"{ctx.cfg.dataset.sample_split}.jsonl"


def sample_request(ctx) -> Dict[str, Any]:
    parameters = OmegaConf.to_container(ctx.cfg.deployment.sample_parameters, resolve=True)
    source = sample_file(ctx)
    if not source.exists() and ctx.cfg.dry_run:  # a plan downloads nothing: an example conversation stands in
        return {"input_data": {"input_string": [EXAMPLE_CONVERSATION], "parameters": parameters}, "params": {}}
    if not source.exists():
        raise FileNotFoundError(
            f"the sample request is drawn from {source}, which does not exist: run the data step first "
            f"(steps=[data,...]) or point from_run= at a run that did"
        )
    from runner.data.sample_request import build_sample_request

    return build_sample_request(source, ctx.cfg.seed, parameters)


def write_sample_request(ctx, path: Path) -> Dict[str, Any]:
    request = sample_request(ctx)
    write_json(path, request)
    return request


def run(ctx, backend) -> TestResult:
    request_file = ctx.run_dir / REQUEST_FILE
    write_sample_request(ctx, request_file)
    outputs = backend.test(ctx, request_file)
    outputs["request_file"] = str(request_file)
    return TestResult.from_outputs(outputs)
