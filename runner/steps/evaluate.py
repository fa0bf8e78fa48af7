"""evaluate: did the fine-tune help? The fine-tuned model against its base on the same held-out chats, every
metric's difference with a paired bootstrap 95% interval and a verdict (better / no clear difference / worse).

What is the same on every backend happens here, before a backend loads a model or submits a job: which rows
(the data step's held-out split, or `evaluate.file`; never the training file), and that they can be scored (each
has an assistant turn after a prompt, `evaluate.max_rows` >= 1). The backend scores them (local: in this process,
runner/local/evaluator.py; azureml: a command job on the cluster, runner/azureml/evaluate.py) and hands back
metrics.json's content; this step turns it into the typed result the run record, the register gate, the sweep and
the summary read. The four files (metrics.json, rows.jsonl, report.md, comparison.png) are in <run dir>/evaluate/.
"""

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Protocol

from runner.errors import MissingInput
from runner.step_results import StepResult

OUT_DIR = "evaluate"  # under the run dir


@dataclass
class EvaluateResult(StepResult):
    STEP: ClassVar[str] = "evaluate"
    rows: Optional[int] = None  # rows scored by both models
    rows_file: Optional[str] = None  # what was scored
    primary_metric: Optional[str] = None  # the metric rows are marked improved/regressed by
    verdicts: Dict[str, str] = field(default_factory=dict)  # metric -> better / no clear difference / worse
    # metric -> label, base, ft, delta, ci_low, ci_high, verdict, rows
    figures: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    summary: List[str] = field(default_factory=list)  # the verdict table, one line per metric
    metrics_json: Optional[str] = None
    rows_jsonl: Optional[str] = None
    report_md: Optional[str] = None
    comparison_png: Optional[str] = None

    def ft_value(self, metric: str) -> Optional[float]:
        return (self.figures.get(metric) or {}).get("ft")


@dataclass
class EvaluationInput:
    """What the backend is handed: the checked rows file, and the training file it must not be."""

    rows_file: str
    train_file: Optional[str]
    out_dir: str


class EvaluateActions(Protocol):
    """What the evaluate step asks of a backend: score base and fine-tuned on `job.rows_file` with the config's
    `evaluate:` settings, write the outputs into `job.out_dir` (or fetch them there), and return
    {"document": metrics.json's content, "paths": {metrics_json, rows_jsonl, report_md, comparison_png}, ...}."""

    def evaluate(self, ctx, job: EvaluationInput) -> Dict[str, Any]: ...


def evaluation_input(ctx) -> EvaluationInput:
    """The rows to score, checked (readable, every row scorable, not the training file) before any model loads."""
    from runner.evaluation.rows import load_rows, rows_file_for

    data = ctx.record.output("data") or {}
    if not ctx.record.output("finetune") and not ctx.record.output("register"):
        raise MissingInput("the evaluate step needs a fine-tuned model: run steps=[...,finetune,evaluate,...] or "
                           "from_run=<an earlier run dir that fine-tuned one>")
    rows_file, train_file = rows_file_for(data, ctx.cfg.evaluate.file)
    if not ctx.cfg.dry_run or ctx.cfg.evaluate.file:  # a dry run has no split files yet, only their plan
        load_rows(rows_file, max_rows=ctx.cfg.evaluate.max_rows, seed=ctx.cfg.evaluate.seed, train_file=train_file)
    return EvaluationInput(rows_file=rows_file, train_file=train_file, out_dir=str(ctx.run_dir / OUT_DIR))


def result_from_document(document: Dict[str, Any], paths: Dict[str, str], rows_file: str) -> EvaluateResult:
    figures = {name: {k: m.get(k) for k in ("label", "base", "ft", "delta", "ci_low", "ci_high", "verdict", "rows")}
               for name, m in (document.get("metrics") or {}).items()}
    return EvaluateResult(rows=document.get("rows"), rows_file=rows_file, primary_metric=document.get("primary_metric"),
                          verdicts=dict(document.get("verdicts") or {}), figures=figures,
                          summary=list(document.get("summary") or []), **paths)


def verdict_tags(result: Optional[EvaluateResult]) -> Dict[str, str]:
    """What a registered version is tagged with: `eval_verdict` (the primary metric's line) and one
    `eval_verdict_<metric>` per metric."""
    if result is None or not result.verdicts:
        return {}
    tags = {f"eval_verdict_{m}": v for m, v in result.verdicts.items()}
    primary = result.primary_metric
    if primary in result.verdicts:
        tags["eval_verdict"] = f"{primary}: {result.verdicts[primary]}"
        order = list(result.figures)
        if primary in order and len(result.summary) == len(order):
            tags["eval_summary"] = " ".join(result.summary[order.index(primary)].split())
    return tags


def run(ctx, backend: EvaluateActions) -> EvaluateResult:
    job = evaluation_input(ctx)
    outputs = dict(backend.evaluate(ctx, job))
    document, paths = outputs.pop("document", None), outputs.pop("paths", {})
    if document is None:  # a dry run: the job is planned, nothing scored
        return EvaluateResult(rows_file=job.rows_file, details=outputs)
    result = result_from_document(document, paths, job.rows_file)
    result.details = outputs
    print("\n".join("    " + line for line in [f"fine-tuned vs base on {result.rows} held-out rows:"] + result.summary),
          flush=True)
    return result
