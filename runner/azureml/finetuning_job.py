"""finetune.route=finetuning_job: the `type: finetuning` job (azure.ai.ml.finetuning) and the model it registers.

The job is built by the SDK's own `create_finetuning_job` (a CustomModelFineTuningJob, YAML `type: finetuning`,
`model_provider: custom`, `task: chatCompletion`, the SDK's FineTuningTaskType), with the finetune group's documented hyperparameters as strings
(runner/azureml/routes.py). It runs serverless when compute=serverless, else on the cluster `compute.name` (the
compute step made sure it exists) or on the VM sizes in `compute.instance_types` (`resources.instance_types`), with
`compute.job_tier` as `queue_settings.job_tier`. It registers the fine-tuned model itself, through its
`registered_model` output: the register step looks that model up rather than registering one.
"""

import re
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from runner.azureml.checks import AzureStepError
from runner.azureml.entities import plain
from runner.step_results import DataResult, FinetuneResult



def task_type() -> str:
    """The SDK's own FineTuningTaskType.CHAT_COMPLETION ("ChatCompletion"): the REST body then says `taskType:
    chatCompletion`, as Azure's samples send. A hand-written "chat_completion" dumps to the same YAML but goes on the
    wire as `chat_completion` (runner/azureml/wire.py shows the difference)."""
    from azure.ai.ml.finetuning import FineTuningTaskType  # lazy: azure is heavy

    return FineTuningTaskType.CHAT_COMPLETION


OUTPUT = "registered_model"  # the job's output that registers the fine-tuned model
TERMINAL = ("Completed", "Failed", "Canceled", "NotResponding")
POLL_SECONDS = 30  # how often the notebook asks for the job's status


def build_finetuning_job(*, model: str, training_data: str, validation_data: Optional[str],
                         hyperparameters: Dict[str, str], output_model_name: str, display_name: str,
                         experiment_name: Optional[str], compute: Optional[str] = None,
                         instance_types: Optional[List[str]] = None, job_tier: Optional[str] = None):
    """The job, as create_finetuning_job builds it. No compute and no instance types: serverless."""
    from azure.ai.ml.finetuning import create_finetuning_job

    kwargs = dict(model=model, task=task_type(), training_data=training_data, output_model_name_prefix=output_model_name,
                  hyperparameters=dict(hyperparameters), compute=compute, instance_types=instance_types or None,
                  job_tier=job_tier, display_name=display_name, experiment_name=experiment_name)
    if validation_data:
        return create_finetuning_job(validation_data=validation_data, **kwargs)
    # azure-ai-ml 1.35.2: create_finetuning_job without validation_data raises UnboundLocalError (it passes a
    # variable it assigns only when there is validation data). Validation data is optional for the job itself, so
    # the same entity is built here the way that function builds it.
    return _job_without_validation(**kwargs)


def _job_without_validation(*, model, task, training_data, output_model_name_prefix, hyperparameters, compute,
                            instance_types, job_tier, **kwargs):
    from azure.ai.ml import Input, Output
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities._job.finetuning.custom_model_finetuning_job import CustomModelFineTuningJob
    from azure.ai.ml.entities._job.job_resources import JobResources
    from azure.ai.ml.entities._job.queue_settings import QueueSettings

    return CustomModelFineTuningJob(
        task=task, model=Input(type=AssetTypes.MLFLOW_MODEL, path=model),
        training_data=Input(type=AssetTypes.URI_FILE, path=training_data), validation_data=None,
        hyperparameters=hyperparameters, compute=compute,
        resources=JobResources(instance_types=instance_types) if instance_types else None,
        queue_settings=QueueSettings(job_tier=job_tier) if job_tier else None,
        outputs={OUTPUT: Output(type="mlflow_model", name=output_model_name_prefix)}, **kwargs)


def output_model_name(base: str, timestamp: str, sweep: Optional[Dict[str, Any]] = None) -> str:
    """The model name this job's `registered_model` output registers: its own, so that concurrent runs and the jobs
    of a sweep never register under one name (and `register` never picks up another job's model): the run's
    timestamp, and a sweep job's number."""
    name = f"{base}-{timestamp}"
    if sweep and sweep.get("job_num") is not None:
        name += f"-job{sweep['job_num']}"
    return name


def finetuning_job_yaml(job: Any) -> Dict[str, Any]:
    """The job as YAML that load_job reads back. The dump writes local files as `azureml:<path>` (an asset
    reference); they are local files the submission uploads, so they are written as the plain paths the job holds."""
    data = plain(job._to_dict())
    for key in ("training_data", "validation_data"):
        value = getattr(job, key, None)
        if value is not None and getattr(value, "type", None) == "uri_file":
            data[key] = {"type": "uri_file", "path": str(value.path)}
    return {"$schema": "https://azuremlschemas.azureedge.net/latest/finetuningJob.schema.json", **data}


def placement(cfg: Any) -> Dict[str, Any]:
    """Where the job runs: serverless (nothing), a cluster of yours, or the VM sizes the service may pick."""
    c = cfg.compute
    if c.kind == "serverless":
        return {"compute": None, "instance_types": None, "job_tier": c.job_tier, "runs_on": "serverless"}
    if c.instance_types:
        types = list(c.instance_types)
        return {"compute": None, "instance_types": types, "job_tier": c.job_tier,
                "runs_on": f"managed compute, instance types {', '.join(types)}"}
    return {"compute": c.name, "instance_types": None, "job_tier": c.job_tier,
            "runs_on": f"managed compute, cluster {c.name}"}


def trained_model_uri(backend: Any, ctx: Any, finetune_job: str) -> str:
    """What the evaluate step scores: the model this job registered (looked up, not registered again)."""
    registered = register(backend, ctx)
    return f"azureml:{registered['name']}:{registered['version']}"


def plan_fields(finetune_outputs: Dict[str, Any]) -> Dict[str, Any]:
    """plan.yaml's route-specific finetune fields: the job's hyperparameters and where it runs."""
    return {"hyperparameters": finetune_outputs.get("hyperparameters", {}), "runs_on": finetune_outputs.get("runs_on")}


def check_explicit_keys(backend: Any, ctx: Any) -> None:
    """The job takes its own few hyperparameters: any other command-line finetune key is refused."""
    from runner.azureml.routes import check_hyperparameter_keys

    check_hyperparameter_keys(ctx.explicit_finetune_keys)


def uses_cluster(cfg: Any) -> bool:
    """A cluster of yours to get or create: not serverless, nor on the VM sizes of compute.instance_types."""
    return not (cfg.compute.kind == "serverless" or cfg.compute.instance_types)


def finetune(backend: Any, ctx: Any) -> Dict[str, Any]:
    """Build, submit and (backend.wait) wait for the job; the record keeps what a later step needs."""
    from runner.azureml.routes import display_name as job_display_name
    from runner.azureml.routes import hyperparameters

    cfg, b = backend.cfg, backend.cfg.backend
    attach, why = backend.job_to_attach(ctx)  # finetune.attach_job, or a from_run cut short after submitting
    if attach:
        attached = _attach(backend, ctx, attach, why)
        if attached is not None:
            return attached
    facts = backend.facts(ctx)
    data = DataResult.recorded(ctx.record)
    effective = backend.finetune_params(ctx)  # decided once per run
    params, notes = effective.params(), effective.note_list()
    sent, left_out = hyperparameters(params, ctx.explicit_finetune_keys)
    where = placement(cfg)
    display_name = ctx.display_name(job_display_name(cfg.model.name, cfg.dataset.slug, sent))
    output_name = output_model_name(cfg.mlflow.registered_model_name, backend.timestamp(ctx), ctx.sweep)
    job = build_finetuning_job(
        model=facts.asset_id, training_data=str(Path(data.train_file).resolve()),
        validation_data=str(Path(data.test_file).resolve()) if data.test_file else None,
        hyperparameters=sent, output_model_name=output_name, display_name=display_name,
        experiment_name=b.experiment_name, compute=where["compute"], instance_types=where["instance_types"],
        job_tier=where["job_tier"])
    for note in notes + left_out:
        ctx.say(note)
    ws = backend.ws(ctx)
    submitted = ws.jobs.create_or_update(job)
    job_name, url = submitted.name, getattr(submitted, "studio_url", None)
    # In the record at once: a wait cut short (network, Ctrl-C) must not lose a job that is running and billing
    ctx.record.note("finetune", job_name=job_name, submitted={
        "job_name": job_name, "studio_url": url, "display_name": display_name, "experiment_name": b.experiment_name,
        "registered_model_name": output_name})
    ctx.say(f"submitted finetuning job {job_name} ({display_name}) on {where['runs_on']}; studio: {url}")
    out = {"job_name": job_name, "studio_url": url, "display_name": display_name, "route": "finetuning_job",
           "experiment_name": b.experiment_name, "runs_on": where["runs_on"], "hyperparameters": sent,
           "registered_model_name": output_name, "effective_params": params,
           "explicit_overrides": sorted(ctx.explicit_finetune_keys), "merge_notes": notes + left_out,
           "status": "submitted"}
    if not b.wait:
        ctx.say("backend.wait=false: not waiting for the job; later steps check that it has completed")
        return out
    out["status"] = _wait(backend, ctx, ws, job_name, url)
    return out


def _attach(backend: Any, ctx: Any, job_name: str, why: str) -> Optional[Dict[str, Any]]:
    """Wait for and continue from a submitted finetuning job, as the pipeline route does (None: submit a new one,
    see backend.continuable_job)."""
    found = backend.continuable_job(ctx, job_name, why, "finetuning")
    if found is None:
        return None
    job, out, earlier = found
    output = (getattr(job, "outputs", None) or {}).get(OUTPUT)
    out.update(route="finetuning_job", registered_model_name=getattr(output, "name", None)
               or earlier.get("registered_model_name") or backend.cfg.mlflow.registered_model_name)
    ctx.record.note("finetune", job_name=job_name, submitted={k: out[k] for k in (
        "job_name", "studio_url", "display_name", "experiment_name", "registered_model_name")})
    if str(getattr(job, "status", None)) == "Completed":
        out["status"] = "Completed"
    elif backend.cfg.backend.wait:
        out["status"] = _wait(backend, ctx, backend.ws(ctx), job_name, out["studio_url"])
    else:
        ctx.say("backend.wait=false: not waiting for the job; later steps check that it has completed")
    return out


def _wait(backend: Any, ctx: Any, ws: Any, job_name: str, url: Optional[str]) -> str:
    """wait_for, saying how to pick the job up again when the wait is cut short (its name is in the record)."""
    try:
        return wait_for(ws, job_name, url)
    except KeyboardInterrupt:
        ctx.say(f"interrupted: finetuning job {job_name} goes on running in Azure (studio: {url}); "
                f"{backend.continue_hint(ctx, job_name)}")
        raise
    except AzureStepError:
        raise
    except Exception as exc:  # network: the job itself runs on
        raise AzureStepError(f"lost track of finetuning job {job_name} ({type(exc).__name__}: {str(exc)[:300]}); "
                             f"the job itself may still be running (studio: {url}): "
                             f"{backend.continue_hint(ctx, job_name)}") from exc


def wait_for(ws: Any, job_name: str, url: Optional[str], sleep=None) -> str:
    """Poll the job's status as the SDK's fine-tuning samples do, until it ends; anything but Completed stops."""
    sleep = sleep or time.sleep  # looked up at call time, so a test can stand in for the clock
    status = str(getattr(ws.jobs.get(job_name), "status", None))
    while status not in TERMINAL:
        sleep(POLL_SECONDS)
        status = str(getattr(ws.jobs.get(job_name), "status", None))
    if status != "Completed":
        raise AzureStepError(f"finetuning job {job_name} is {status}, not Completed (studio: {url})")
    return status


def register(backend: Any, ctx: Any) -> Dict[str, Any]:
    """The model the job registered through its `registered_model` output (the job names it; the service versions
    it): looked up, not registered again."""
    job_name = backend.job_name(ctx)
    ws = backend.ws(ctx)
    finetuned = FinetuneResult.recorded(ctx.record)
    if finetuned.status != "Completed":
        wait_for(ws, job_name, finetuned.studio_url)
    job = ws.jobs.get(job_name)
    output = (getattr(job, "outputs", None) or {}).get(OUTPUT)
    name = getattr(output, "name", None) or finetuned.registered_model_name
    if not name:
        raise AzureStepError(f"finetuning job {job_name} has no {OUTPUT} output to read the model's name from")
    # the name is this job's own (output_model_name), so its latest version is the one this job registered; a model
    # whose path names another job's output is not ours (a name shared with a job from before unique names)
    model = ws.models.get(name=name, label="latest")
    source = re.match(r"^azureml://jobs/([^/]+)/", str(getattr(model, "path", "") or ""))
    if source and source.group(1) != job_name:
        raise AzureStepError(f"model {model.name}:{model.version} was registered by job {source.group(1)}, not by "
                             f"{job_name}: register it from its own job (finetune.attach_job={job_name} with a model "
                             f"name of its own)")
    ctx.say(f"the job registered {model.name}:{model.version} ({model.id})")
    return {"model_id": model.id, "name": model.name, "version": str(model.version), "model_uri": model.id,
            "source": f"azureml://jobs/{job_name}/outputs/{OUTPUT}", "registered_by": "the finetuning job"}
