"""finetune: train (here) or submit the pipeline job (Azure) on the data step's files. Its figures are what the
run summary and a sweep rank by."""

from typing import Any, Dict, Protocol

from runner.errors import ConfigError, MissingInput
from runner.step_results import DataResult, FinetuneResult

FIGURES = ("train_loss", "eval_loss", "eval_loss_before", "perplexity", "tokens_per_s")


class FinetuneActions(Protocol):
    """What the finetune step asks of a backend."""

    submits_jobs: bool

    def job_to_attach(self, ctx) -> tuple: ...

    def finetune(self, ctx) -> Dict[str, Any]: ...


def run(ctx, backend: FinetuneActions) -> FinetuneResult:
    if ctx.cfg.finetune.attach_job and not backend.submits_jobs:
        raise ConfigError(f"finetune.attach_job={ctx.cfg.finetune.attach_job}: only backend=azureml submits jobs to "
                          f"attach to; drop it")
    attaching = backend.job_to_attach(ctx)[0]
    data = DataResult.recorded(ctx.record)
    if not attaching and (not data.train_file or not data.test_file):
        raise MissingInput("the finetune step needs the data step's files: run steps=[data,finetune,...] or "
                           "from_run=<an earlier run dir>")
    return FinetuneResult.from_outputs(backend.finetune(ctx))
