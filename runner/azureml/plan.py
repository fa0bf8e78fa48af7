"""dry_run on azureml: every Azure object the run would create, in azure-ai-ml's own YAML, under <run dir>/plan/.

    compute.yaml       AmlCompute                 (azure.ai.ml.load_compute)
    pipeline_job.yaml  the chat_completion_pipeline job   (load_job)
    model.yaml         the Model registered from the job's output   (load_model)
    endpoint.yaml      ManagedOnlineEndpoint with its traffic   (load_online_endpoint)
    deployment.yaml    ManagedOnlineDeployment    (load_online_deployment)
    request.json       the scoring request the test step sends
    plan.yaml          the summary: effective params and where each came from, display name, checks, warnings

No network and no credentials: the model's tags come from the model config, the component from the spec file
`backend.component_spec`, against which the pipeline inputs are validated (load_component + the DSL call, which
refuses any keyword the component does not declare, then the job's own validation).
"""

import tempfile
from pathlib import Path
from typing import Any, Dict

from omegaconf import OmegaConf

from runner.atomic import write_text
from runner.schema import ConfigError

# The pipeline job's name is given by the service at submission; the plan refers to it by this placeholder.
JOB_NAME_PLACEHOLDER = "PIPELINE_JOB_NAME"


def _write_yaml(path: Path, data: Dict[str, Any]) -> Path:
    import json

    import yaml

    data = json.loads(json.dumps(data, default=str))  # OrderedDicts and other mappings the SDK returns → plain
    return write_text(path, yaml.safe_dump(data, sort_keys=False, default_flow_style=False))


def _dump_entity(entity: Any, path: Path) -> Path:
    """entity._to_dict() written by us: some entities' dump() writes nothing (ManagedOnlineEndpoint)."""
    data = entity._to_dict()
    return _write_yaml(path, {k: v for k, v in data.items() if v is not None})


def component_reference(spec, cfg) -> str:
    """What the submitted job points at: the exported spec's own id, a pinned version, or the label."""
    b = cfg.backend
    if spec.asset_id and str(spec.asset_id).startswith("azureml://"):
        return str(spec.asset_id)
    if b.component_version:
        return f"azureml://registries/{b.registry_name}/components/{b.component_name}/versions/{b.component_version}"
    return f"azureml://registries/{b.registry_name}/components/{b.component_name}/labels/{b.component_label}"


def load_component_from_spec(spec):
    """azure.ai.ml's component entity from the spec (an exported spec is trimmed to the component YAML keys)."""
    import yaml
    from azure.ai.ml import load_component

    if set(spec.raw) <= set(spec.component_dict()) and Path(spec.source).is_file():
        return load_component(source=spec.source)
    with tempfile.TemporaryDirectory() as tmp:
        trimmed = Path(tmp) / "component.yaml"
        trimmed.write_text(yaml.safe_dump(spec.component_dict(), sort_keys=False), encoding="utf-8")
        return load_component(source=str(trimmed))


def _pipeline_job_yaml(job, *, component_ref: str, file_inputs: Dict[str, str], experiment_name: str) -> Dict:
    from runner.azureml.translate import NODE_NAME

    data = job._to_dict()
    node = data["jobs"][NODE_NAME]
    # The dumped job inlines the component, which load_job refuses; the real run submits the registry component.
    node["component"] = component_ref
    # The DSL dump writes local file inputs as `azureml:<path>` (an asset reference); they are local files that
    # the submission uploads, so they are written as plain paths.
    for key, path in file_inputs.items():
        node["inputs"][key] = {"type": "uri_file", "path": path}
    ordered = {"$schema": "https://azuremlschemas.azureedge.net/latest/pipelineJob.schema.json",
               "experiment_name": experiment_name}
    ordered.update({k: v for k, v in data.items() if k not in ("$schema",)})
    return ordered


def write_azure_plan(ctx, backend) -> Dict[str, Any]:
    from runner.azureml.checks import check_endpoint_name
    from runner.azureml.spec import check_required, prepare_inputs
    from runner.azureml.tags import facts_from_config
    from runner.azureml.translate import (
        build_compute,
        build_deployment,
        build_endpoint,
        build_model,
        build_pipeline_job,
        pipeline_inputs,
        trained_model_path,
    )
    from runner.plan import write_request

    cfg = ctx.cfg
    plan_dir = ctx.plan_dir
    plan_dir.mkdir(parents=True, exist_ok=True)

    # ---- the checks a real run makes, with the model config's tags in place of the registry's ----------------
    facts = facts_from_config(cfg.model)
    warnings = backend.model_checks(ctx, facts, refuse_archived=False)
    gpus = cfg.compute.gpus_per_node
    if not gpus:
        warnings.append(f"compute.gpus_per_node=0: the run takes it from compute.list_sizes() for "
                        f"{cfg.compute.size}; this plan assumes 1")
        gpus = 1
    spec = backend.local_spec(required=True)
    params, merge_notes = backend.effective_params(ctx, facts)
    inputs, dropped = prepare_inputs(params, spec, ctx.explicit_finetune_keys)
    display_name = ctx.display_name(backend.display_name(params, gpus))
    timestamp = str(int(backend.clock()))
    ctx.live["timestamp"] = timestamp
    endpoint_name = backend.endpoint_name(ctx)
    check_endpoint_name(endpoint_name)

    data_dir = Path(cfg.dataset.download_dir).resolve()
    train_file = str(data_dir / f"{cfg.dataset.train_split}.jsonl")
    test_file = str(data_dir / f"{cfg.dataset.test_split}.jsonl")

    # ---- the pipeline job: the component called exactly as the run calls it ---------------------------------
    component = load_component_from_spec(spec)
    kwargs = pipeline_inputs(model_id=facts.asset_id, cluster=cfg.compute.name, train_file=train_file,
                             test_file=test_file, gpus_per_node=gpus, finetune_inputs=inputs, spec=spec)
    check_required(kwargs, spec)
    try:
        job = build_pipeline_job(component, kwargs, display_name=display_name,
                                 force_rerun=cfg.backend.force_rerun,
                                 continue_on_step_failure=cfg.backend.continue_on_step_failure,
                                 experiment_name=cfg.backend.experiment_name)
    except Exception as exc:  # UnexpectedKeywordError and friends: the inputs do not fit the component
        raise ConfigError(f"the pipeline inputs do not fit {spec.name} {spec.version} ({spec.source}): {exc}") from exc
    validation = job._validate()
    if not validation.passed:
        raise ConfigError(f"the pipeline job does not validate against {spec.source}:\n{validation}")

    files = {}
    files["compute"] = _dump_entity(build_compute(cfg.compute, cfg.compute.tier), plan_dir / "compute.yaml")
    files["pipeline_job"] = _write_yaml(plan_dir / "pipeline_job.yaml", _pipeline_job_yaml(
        job, component_ref=component_reference(spec, cfg),
        file_inputs={"train_file_path": train_file, "test_file_path": test_file},
        experiment_name=cfg.backend.experiment_name))
    model = build_model(job_name=JOB_NAME_PLACEHOLDER, name=cfg.mlflow.registered_model_name, version=timestamp,
                        base_model_name=cfg.model.name)
    files["model"] = _dump_entity(model, plan_dir / "model.yaml")
    traffic = OmegaConf.to_container(cfg.deployment.traffic)
    endpoint = build_endpoint(name=endpoint_name, registered_model_name=model.name,
                              auth_mode=cfg.deployment.auth_mode, traffic=traffic)
    files["endpoint"] = _dump_entity(endpoint, plan_dir / "endpoint.yaml")
    deployment = build_deployment(cfg.deployment, endpoint_name=endpoint_name,
                                  model_id=f"azureml:{model.name}:{model.version}")
    files["deployment"] = _dump_entity(deployment, plan_dir / "deployment.yaml")
    files["request"] = write_request(ctx)

    summary = {
        "backend": "azureml",
        "steps": list(cfg.steps),
        "display_name": display_name,
        "experiment_name": cfg.backend.experiment_name,
        "workspace": {
            "config_path": cfg.backend.config_path,
            "subscription_id": "set" if cfg.backend.subscription_id else "unset",
            "resource_group": cfg.backend.resource_group,
            "workspace_name": cfg.backend.workspace_name,
            "registry_name": cfg.backend.registry_name,
        },
        "model": {**facts.to_dict(), "tags_from": "model config (a real run reads the registry's tags)"},
        "compute": {"name": cfg.compute.name, "size": cfg.compute.size, "gpus_per_node": gpus,
                    "tier": cfg.compute.tier, "low_priority_fallback": cfg.compute.low_priority_fallback},
        "component": {"reference": component_reference(spec, cfg), "spec": spec.source,
                      "spec_version": spec.version},
        "finetune": {
            "merge_order": "config -> model_specific_defaults -> explicit finetune.* overrides",
            "explicit_overrides": sorted(ctx.explicit_finetune_keys),
            "merge_notes": merge_notes + dropped,
            "effective_params": params,
            "component_inputs": inputs,
        },
        "register": {"name": model.name, "version": timestamp,
                     "path": trained_model_path("<the pipeline job's name>")},
        "endpoint": {"name": endpoint_name, "deployment": cfg.deployment.deployment_name, "traffic": traffic,
                     "instance_type": cfg.deployment.instance_type},
        "cleanup": {"delete_endpoint": endpoint_name, "delete_compute": cfg.cleanup.delete_compute},
        "warnings": warnings,
        "files": {k: str(v) for k, v in files.items()},
    }
    plan_file = _write_yaml(plan_dir / "plan.yaml", summary)
    print(f"display name: {display_name}")
    for note in merge_notes + dropped:
        print(f"  note: {note}")
    for w in warnings:
        print(f"  WARNING: {w}")
    for k, v in files.items():
        print(f"  {k:<13} {v}")
    return {"plan": str(plan_file), "display_name": display_name, "warnings": warnings,
            **{k: str(v) for k, v in files.items()}}
