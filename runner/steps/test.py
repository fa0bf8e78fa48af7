"""test: one seeded row of the sample split, as the Azure ML scoring request, sent to the endpoint; the reply.

`test.rows=N` also scores the endpoint on N of the evaluate step's held-out rows through both of its routes (the
scoring format and the OpenAI chat route), greedy with `evaluate.max_new_tokens`, with the evaluate step's
generated metrics, and counts how many replies equal the evaluate step's fine-tuned reply for the same row
(runner/evaluation/endpoint_rows.py): with greedy decoding they must all be equal.
"""

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Protocol

from runner.atomic import write_json
from runner.data.sample_request import sample_request
from runner.step_results import DataResult, StepResult

REQUEST_FILE = "sample_score.json"
ROWS_FILE = "test_rows.json"  # under the run dir: each row's prompt, reference and both routes' replies


@dataclass
class TestResult(StepResult):
    STEP: ClassVar[str] = "test"
    __test__ = False  # not a pytest test class, whatever its name
    reply: Optional[str] = None
    request_file: Optional[str] = None
    rows: Optional[int] = None  # test.rows: held-out rows scored through the endpoint
    endpoint_metrics: Dict[str, Dict[str, float]] = field(default_factory=dict)  # route -> metric -> value
    evaluate_parity: Dict[str, Any] = field(default_factory=dict)  # route -> {rows, equal, differ}
    rows_file: Optional[str] = None


class TestActions(Protocol):
    """What the test step asks of a backend."""

    def test(self, ctx, request_file) -> Dict[str, Any]: ...

    def score_rows(self, ctx, conversations: List[list], max_new_tokens: int) -> Dict[str, List[Dict[str, Any]]]:
        """{route: [{"reply", and where the route says so "stopped", "reply_tokens"}]}, one per conversation,
        greedy."""


def score_held_out_rows(ctx, backend: TestActions, result: TestResult) -> None:
    from runner.evaluation.endpoint_rows import parity, pick_rows, route_scores
    from runner.evaluation.metrics import RowOutput

    rows = pick_rows(ctx.record.output("evaluate"), ctx.record.output("data"), ctx.cfg.evaluate, ctx.cfg.test.rows)
    replies = backend.score_rows(ctx, [r.prompt for r in rows], ctx.cfg.evaluate.max_new_tokens)
    references = [r.reference for r in rows]
    for route, answers in replies.items():
        outputs = [RowOutput(reply=a.get("reply"), stopped=a.get("stopped"), reply_tokens=a.get("reply_tokens"))
                   for a in answers]
        result.endpoint_metrics[route] = route_scores(outputs, references, list(ctx.cfg.evaluate.metrics))
        same = parity(rows, [a.get("reply") for a in answers])
        if same is not None:
            result.evaluate_parity[route] = same
        shown = ", ".join(f"{k} {v:.3f}" for k, v in result.endpoint_metrics[route].items())
        ctx.say(f"{route}: {len(rows)} held-out rows: {shown}"
                + (f"; {same['equal']}/{same['rows']} replies equal the evaluate step's" if same else ""))
    result.rows = len(rows)
    result.rows_file = str(write_json(ctx.run_dir / ROWS_FILE, [
        {"prompt": r.prompt, "reference": r.reference, "evaluate_reply": r.evaluate_reply,
         **{f"{route}_reply": replies[route][i].get("reply") for route in replies}} for i, r in enumerate(rows)]))


def run(ctx, backend: TestActions) -> TestResult:
    request_file = ctx.run_dir / REQUEST_FILE
    write_json(request_file, sample_request(ctx.cfg, DataResult.recorded(ctx.record).sample_file))
    outputs = backend.test(ctx, request_file)
    outputs["request_file"] = str(request_file)
    result = TestResult.from_outputs(outputs)
    if ctx.cfg.test.rows and not ctx.cfg.dry_run:
        score_held_out_rows(ctx, backend, result)
    return result
