"""The pipeline route (the seed notebook's): the registry's chat_completion_pipeline component on your cluster.
Its finetune builds the pipeline job from the live component (checked against the pinned contract), submits and
follows it, or continues one submitted earlier; its register makes a Model of the job's output. (The other route:
finetuning_job.py; the backend chooses one of the two once.)"""

from pathlib import Path
from typing import Any, Dict, Optional

from runner.azureml.checks import AzureStepError
from runner.errors import MissingInput
from runner.schema import ConfigError
from runner.step_results import ComputeResult, DataResult


def check_explicit_keys(backend: Any, ctx: Any) -> None:
    """A command-line finetune key the component does not take is refused (against the pinned contract)."""
    from runner.azureml.spec import check_explicit_keys as check_against_spec

    spec = backend.local_spec()
    if spec is not None:
        check_against_spec(ctx.explicit_finetune_keys, spec)


def uses_cluster(cfg: Any) -> bool:
    return True  # the component runs on compute.name


def trained_model_uri(backend: Any, ctx: Any, finetune_job: str) -> str:
    """What the evaluate step scores: the completed pipeline job's trained_model output."""
    from runner.azureml.translate import trained_model_path

    backend.require_completed(ctx, finetune_job)
    return trained_model_path(finetune_job)


def plan_fields(finetune_outputs: Dict[str, Any]) -> Dict[str, Any]:
    return {}  # the component's inputs are in plan.yaml already


def placement(cfg: Any) -> Dict[str, Any]:
    return {"compute": cfg.compute.name, "instance_types": None, "job_tier": None,
            "runs_on": f"managed compute, cluster {cfg.compute.name}"}


def finetune(backend: Any, ctx: Any) -> Dict[str, Any]:
    """Build the pipeline job from the live component, submit it and (backend.wait) follow it to the end."""
    from runner.azureml.spec import check_live_component, check_required, prepare_inputs
    from runner.azureml.translate import build_pipeline_job, pipeline_inputs

    cfg, b = backend.cfg, backend.cfg.backend
    attach, why = backend.job_to_attach(ctx)
    if attach:
        attached = _attach(backend, ctx, attach, why)
        if attached is not None:
            return attached
    facts = backend.facts(ctx)
    gpus = ComputeResult.recorded(ctx.record).gpus_per_node or cfg.compute.gpus_per_node
    if not gpus:
        raise MissingInput("GPUs per node unknown: run the compute step (steps=[compute,...]) or set "
                           "compute.gpus_per_node")
    data = DataResult.recorded(ctx.record)  # the step (runner/steps/finetune.py) made sure the files are there
    component, spec, unread, pinned, diff = _live_component(backend, ctx)
    effective = backend.finetune_params(ctx)  # decided once per run
    params, notes = effective.params(), effective.note_list()
    inputs, dropped = prepare_inputs(params, spec, ctx.explicit_finetune_keys)  # explicit keys named first
    overridden = diff.defaults_overridden(inputs)
    for line in overridden:
        ctx.say(f"warning: component default changed: {line}")
    if diff:  # what this run sends by the contract it was checked against must still be there
        check_live_component(diff, prepare_inputs(params, pinned)[0])
    display_name = ctx.display_name(backend.display_name(params, gpus))
    # Absolute paths: a run picked up later (from_run=) from another directory uploads the same files.
    kwargs = pipeline_inputs(model_id=facts.asset_id, cluster=cfg.compute.name,
                             train_file=str(Path(data.train_file).resolve()),
                             test_file=str(Path(data.test_file).resolve()),
                             gpus_per_node=gpus, finetune_inputs=inputs, spec=spec)
    check_required(kwargs, spec)
    check_live_component(diff, kwargs)
    for note in notes + dropped:
        ctx.say(note)
    try:
        job = build_pipeline_job(component, kwargs, display_name=display_name, force_rerun=b.force_rerun,
                                 continue_on_step_failure=b.continue_on_step_failure,
                                 experiment_name=b.experiment_name)
    except Exception as exc:  # UnexpectedKeywordError and friends: the inputs do not fit the component
        raise ConfigError(f"the pipeline inputs do not fit {spec.name} {spec.version} ({spec.source}): "
                          f"{exc}") from exc
    validation = job._validate()  # the SDK's own checks, before anything is uploaded or submitted
    if not validation.passed:
        raise ConfigError(f"the pipeline job does not validate against {spec.name} {spec.version}:\n"
                          f"{validation}")
    ws = backend.ws(ctx)
    submitted = ws.jobs.create_or_update(job, experiment_name=b.experiment_name)
    job_name, url = submitted.name, getattr(submitted, "studio_url", None)
    # In the record at once: a stream cut short (network, Ctrl-C) must not lose a job that is running and billing
    ctx.record.note("finetune", job_name=job_name, submitted={
        "job_name": job_name, "studio_url": url, "display_name": display_name,
        "experiment_name": b.experiment_name})
    ctx.say(f"submitted pipeline job {job_name} ({display_name}); studio: {url}")
    out = {"job_name": job_name, "studio_url": url, "display_name": display_name,
           "experiment_name": b.experiment_name, "component": f"{spec.name}:{spec.version}",
           "component_version": spec.version, "component_diff": diff.to_dict(),
           "component_unread": unread or None, "component_defaults_overridden": overridden,
           "effective_params": params, "explicit_overrides": sorted(ctx.explicit_finetune_keys),
           "inputs": {k: v for k, v in inputs.items()}, "merge_notes": notes + dropped,
           "gpus_per_node": gpus, "status": "submitted"}
    if not b.wait:
        ctx.say("backend.wait=false: not waiting for the job; later steps check that it has completed")
        return out
    _stream(backend, ctx, job_name, url)
    out["status"] = "Completed"
    return out


def _live_component(backend, ctx) -> tuple:
    """(component, its spec, why it could not be read or "", the pinned contract, their diff). The registry serves
    `latest`; the runner was checked against a pinned contract: what changed is said here."""
    from runner.azureml.spec import compare_specs

    b = backend.cfg.backend
    registry = backend.registry(ctx)
    if b.component_version:
        component = registry.components.get(name=b.component_name, version=str(b.component_version))
    else:
        component = registry.components.get(name=b.component_name, label=b.component_label)
    spec, unread = backend.component_spec(component)
    if unread:  # checked against the pinned contract only: the registry's may differ, and nobody would know
        ctx.say(f"warning: {unread}")
        ctx.record.note("finetune", component_unread=unread)
    pinned = backend.local_spec(required=True)
    diff = compare_specs(pinned, spec)
    for line in diff.lines():
        ctx.say(f"component: {line}")
    return component, spec, unread, pinned, diff


def _stream(backend, ctx, job_name: str, url: Optional[str]) -> None:
    """jobs.stream until the job ends. A failed job is an error; a stream that breaks (network, Ctrl-C) leaves
    the job running in Azure, and says how to pick it up (its name is already in the record)."""
    from azure.ai.ml.exceptions import JobException

    try:
        backend.ws(ctx).jobs.stream(job_name)
    except KeyboardInterrupt:
        ctx.say(f"interrupted: pipeline job {job_name} goes on running in Azure (studio: {url}); "
                f"{backend.continue_hint(ctx, job_name)}")
        raise
    except JobException as exc:
        raise AzureStepError(f"pipeline job {job_name} did not complete: {exc} (studio: {url})") from exc
    except Exception as exc:
        raise AzureStepError(f"lost the stream of pipeline job {job_name} ({type(exc).__name__}: "
                             f"{str(exc)[:300]}); the job itself may still be running (studio: {url}): "
                             f"{backend.continue_hint(ctx, job_name)}") from exc


def _attach(backend, ctx, job_name: str, why: str) -> Optional[Dict[str, Any]]:
    """Wait for and continue from a submitted pipeline job (None: submit a new one, see continuable_job)."""
    found = backend.continuable_job(ctx, job_name, why, "pipeline")
    if found is None:
        return None
    job, out, _ = found
    ctx.record.note("finetune", job_name=job_name, submitted={k: out[k] for k in (
        "job_name", "studio_url", "display_name", "experiment_name")})
    if getattr(job, "status", None) == "Completed":
        out["status"] = "Completed"
    elif backend.cfg.backend.wait:
        _stream(backend, ctx, job_name, out["studio_url"])
        out["status"] = "Completed"
    else:
        ctx.say("backend.wait=false: not waiting for the job; later steps check that it has completed")
    return out


def register(backend: Any, ctx: Any) -> Dict[str, Any]:
    from runner.azureml.translate import build_model

    job_name = backend.job_name(ctx)
    backend.require_completed(ctx, job_name)
    model = build_model(job_name=job_name, name=backend.cfg.mlflow.registered_model_name,
                        version=backend.timestamp(ctx), base_model_name=backend.cfg.model.name)
    registered = backend.ws(ctx).models.create_or_update(model)
    ctx.say(f"registered {registered.name}:{registered.version} ({registered.id})")
    return {"model_id": registered.id, "name": registered.name, "version": str(registered.version),
            "model_uri": registered.id, "source": model.path}
