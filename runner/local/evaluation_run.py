"""The local backend's evaluate step: which two models, the evaluator (runner/local/evaluator.py) on the step's
rows in this process, the four files in <run dir>/evaluate/, and the figures on the fine-tune's MLflow run.

Which fine-tuned model: the finetune step's final model of this run (the default workflow evaluates before it
registers). With `from_run=` and no finetune step here, the earlier run's registered version when it has one,
checked against the record first (runner/local/model_identity.py: the version still belongs to the run that
registered it, its files unchanged), else its final model folder. A kept LoRA adapter (merge_lora_weights=false)
is scored as an adapter on the base weights (one copy in memory); a merged model as a second set of weights.
The base: the model step's folder (this run's or from_run's).
"""

from pathlib import Path
from typing import Any, Dict, Optional

from runner.errors import MissingInput
from runner.step_results import FinetuneResult, ModelResult


def settings_from_config(evaluate_cfg):
    from runner.local.evaluator import EvaluatorSettings

    return EvaluatorSettings(
        max_rows=evaluate_cfg.max_rows, max_new_tokens=evaluate_cfg.max_new_tokens,
        batch_size=evaluate_cfg.batch_size, seed=evaluate_cfg.seed, time_budget_s=evaluate_cfg.time_budget_s,
        metrics=list(evaluate_cfg.metrics), do_sample=evaluate_cfg.do_sample, temperature=evaluate_cfg.temperature,
        top_p=evaluate_cfg.top_p, resamples=evaluate_cfg.resamples, device=evaluate_cfg.device)


def _existing(folder: Optional[str]) -> Optional[Path]:
    return Path(folder) if folder and Path(folder).is_dir() else None


def fine_tuned_model(ctx, tracking_uri: str) -> Dict[str, Any]:
    """{"ft_dir" | "adapter_dir": folder, "source": what it is} of the model to score against the base."""
    finetune = FinetuneResult.recorded(ctx.record)
    here = ctx.record.status("finetune") == "ok"
    registered = ctx.record.output("register") or {}
    if not here and registered.get("model_uri"):
        from runner.local.model_identity import model_folder, verify_registered_model

        verify_registered_model(tracking_uri, registered)  # the version is still the one the record registered
        folder = model_folder(tracking_uri, registered["model_uri"])["folder"]
        if folder is None:
            raise MissingInput(f"{registered['model_uri']} lives in a remote artifact store; the local evaluator "
                               f"reads a local folder")
        return {"ft_dir": folder, "source": registered["model_uri"]}
    adapter = _existing(finetune.adapter_dir)
    if adapter is not None:
        return {"adapter_dir": adapter, "source": str(adapter)}
    final = _existing(finetune.final_model_dir)
    if final is None:
        raise MissingInput(f"the fine-tuned model is gone: {finetune.final_model_dir or 'no final model'} "
                           f"(a later run of the same training key removes an unheld training folder); register it "
                           f"or fine-tune again")
    return {"ft_dir": final, "source": str(final)}


def log_evaluation(tracking_uri: str, run_id: str, evaluation, paths: Dict[str, str]) -> None:
    """eval_base_*/eval_ft_*/eval_delta_* metrics, eval_verdict_* tags, the rows as an MLflow table and the files,
    on the fine-tune's MLflow run."""
    import time

    from mlflow.entities import Metric, RunTag

    from runner.evaluation.report import mlflow_metrics, rows_table
    from runner.local.tracking import log_artifact, mlflow_client

    client = mlflow_client(tracking_uri)
    now = int(time.time() * 1000)
    figures = {**mlflow_metrics(evaluation), "eval_rows": float(len(evaluation.rows))}
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in figures.items()],
                     tags=[RunTag(f"eval_verdict_{c.metric}", c.verdict) for c in evaluation.comparisons])
    client.log_table(run_id, data=rows_table(evaluation), artifact_file="evaluate/rows.json")
    for path in paths.values():
        log_artifact(tracking_uri, run_id, path, artifact_path="evaluate")


def evaluate_here(ctx, job, tracking_uri: str) -> Dict[str, Any]:
    import tempfile

    from runner.evaluation.report import metrics_document, write_outputs
    from runner.local.evaluate_program import model_folder
    from runner.local.evaluator import evaluate

    base_dir = _existing(ModelResult.recorded(ctx.record).model_dir)
    if base_dir is None:
        raise MissingInput("the evaluate step needs the base model: run the model step (or from_run=<run dir>)")
    ft = fine_tuned_model(ctx, tracking_uri)
    ctx.say(f"base {base_dir} vs fine-tuned {ft['source']} on {job.rows_file}")
    with tempfile.TemporaryDirectory(prefix="ftrun-eval-") as scratch:
        # a registered version is an MLflow folder (weights in model/, tokenizer in components/): joined for loading
        ft_dir = model_folder(ft["ft_dir"], Path(scratch)) if ft.get("ft_dir") else None
        evaluation = evaluate(base_dir=base_dir, rows_file=job.rows_file, adapter_dir=ft.get("adapter_dir"),
                              ft_dir=ft_dir, settings=settings_from_config(ctx.cfg.evaluate),
                              train_file=job.train_file, progress=ctx.say)
    paths = write_outputs(evaluation, job.out_dir)
    run_id = FinetuneResult.recorded(ctx.record).mlflow_run_id
    if run_id:
        log_evaluation(tracking_uri, run_id, evaluation, paths)
    ctx.say(f"report: {paths['report_md']}")
    info = evaluation.info
    return {"document": metrics_document(evaluation), "paths": paths, "fine_tuned": ft["source"],
            "base_model_dir": str(base_dir), "mode": info["mode"], "rows_per_s": info["rows_per_s"],
            "stopped_early": info["stopped_early"], "mlflow_run_id": run_id}
