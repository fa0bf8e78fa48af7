"""The evaluate step on Azure ML with a cluster (the pipeline route, or a finetuning job on managed compute): after
the fine-tune job has completed, a command job on the cluster runs the project's own evaluator
(runner/azureml/evaluate_job.py says what the job is) over the registry base model and the fine-tuned model (the
pipeline's trained_model output, or the model the finetuning job registered), on the data step's held-out rows;
its figures are read back from the workspace's MLflow (the job logs `eval_base_*`, `eval_ft_*`, `eval_delta_*`
into its own run, whose id is the job name) and turned into the step's result. The four files stay in the job's `evaluation` output
(`az ml job download --name <job> --output-name evaluation`).

A dry run plans the job (plan/evaluate_job.yaml, loadable by azure.ai.ml.load_job) and reads nothing back.
The job's code is a staged copy of the `runner` package under the state root, in a folder named by its content,
so the dry run and the run hand Azure the same code path and the same upload.
"""

import hashlib
from pathlib import Path
from typing import Any, Dict

from runner.step_results import FinetuneResult, ModelResult

CODE_DIR = "azureml/evaluate_code"  # under the state root


def package_digest(package: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                       and p.suffix != ".pyc"):
        digest.update(f"{path.relative_to(package).as_posix()}\0".encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def staged_code(state_root) -> Path:
    """The job's code folder: <state root>/azureml/evaluate_code/<content digest>/runner (staged once)."""
    from runner.azureml.evaluate_job import stage_code

    package = Path(__file__).resolve().parents[1]
    folder = Path(state_root) / CODE_DIR / package_digest(package)
    if not (folder / "runner" / "__init__.py").is_file():
        staging = folder.with_name(folder.name + f".tmp{id(folder)}")
        stage_code(staging)
        try:
            staging.rename(folder)
        except OSError:  # another run staged the same content first
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    return folder.resolve()


def job_settings(evaluate_cfg) -> Dict[str, Any]:
    keys = ("max_rows", "max_new_tokens", "batch_size", "seed", "time_budget_s", "temperature", "top_p",
            "resamples", "do_sample")
    settings = {k: evaluate_cfg[k] for k in keys}
    settings["metrics"] = list(evaluate_cfg.metrics)
    if not settings["time_budget_s"]:
        settings.pop("time_budget_s")  # 0 = no budget: the program's default
    return settings


def read_back(backend: Any, ctx: Any, job_name: str) -> Dict[str, Any]:
    """metrics.json's parts from the evaluate job's MLflow run in the workspace."""
    from runner.azureml.metrics import read_job_metrics
    from runner.evaluation.from_metrics import document_from_metrics

    ws = backend.ws(ctx)
    tracking_uri = ws.workspaces.get(ws.workspace_name).mlflow_tracking_uri
    history = read_job_metrics(tracking_uri, job_name, credential=backend.session(ctx).credential)
    values = {name: points[-1][1] for name, points in history.items() if points}
    return document_from_metrics(values, list(ctx.cfg.evaluate.metrics))


def placement(compute_cfg) -> Dict[str, Any]:
    """The cluster the fine-tune ran on, or (compute.instance_types, no cluster) serverless compute of its first
    VM size."""
    if compute_cfg.instance_types:
        return {"compute": None, "instance_type": str(compute_cfg.instance_types[0])}
    return {"compute": compute_cfg.name}


def evaluate(backend: Any, ctx: Any, job: Any) -> Dict[str, Any]:
    from runner.azureml.evaluate_job import build_evaluate_job, job_output_path

    cfg = backend.cfg
    finetune_job = backend.job_name(ctx)
    ft_model = backend.route.trained_model_uri(backend, ctx, finetune_job)
    base_model = ModelResult.require(ctx.record, "the evaluate step needs the model step's registry model",
                                     needs="model_id").model_id
    rows_path = str(Path(job.rows_file).resolve())
    command_job = build_evaluate_job(
        code_dir=staged_code(cfg.paths.root), base_model_path=base_model, ft_model_path=ft_model, rows_path=rows_path,
        **placement(cfg.compute), settings=job_settings(cfg.evaluate), environment=cfg.evaluate.azureml_environment,
        experiment_name=cfg.backend.experiment_name,
        display_name=ctx.display_name(f"evaluate-{FinetuneResult.recorded(ctx.record).display_name or finetune_job}"))
    submitted = backend.ws(ctx).jobs.create_or_update(command_job, experiment_name=cfg.backend.experiment_name)
    name, url = submitted.name, getattr(submitted, "studio_url", None)
    ctx.record.note("evaluate", job_name=name)  # a cut-short stream must not lose a billing job
    ctx.say(f"submitted evaluate job {name}; studio: {url}")
    out = {"job_name": name, "studio_url": url, "base_model": base_model, "fine_tuned": ft_model,
           "outputs": job_output_path(name, "evaluation")}
    if cfg.dry_run:
        return out
    follow(backend, ctx, name, url)
    return {**out, "document": read_back(backend, ctx, name), "paths": {}}


def follow(backend: Any, ctx: Any, name: str, url: Any) -> None:
    """jobs.stream until the evaluate job ends; anything but Completed is an error naming the job (a stream that
    breaks leaves the job running: its name is in the record, `steps=[evaluate] from_run=` submits a new one)."""
    from azure.ai.ml.exceptions import JobException

    from runner.azureml.checks import AzureStepError

    try:
        backend.ws(ctx).jobs.stream(name)
    except JobException as exc:
        raise AzureStepError(f"evaluate job {name} did not complete: {exc} (studio: {url})") from exc
    status = getattr(backend.ws(ctx).jobs.get(name), "status", None)
    if status != "Completed":
        raise AzureStepError(f"evaluate job {name} is {status}, not Completed (studio: {url})")
