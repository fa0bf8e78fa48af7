"""plan.yaml: a dry run's summary, what the steps recorded (their outputs, as in a real run's record) and every call
the planning clients took (runner/azureml/planning.py), in order, with the files written beside it."""

from pathlib import Path
from typing import Any, Dict

from runner.azureml.planning import write_yaml


def write_plan_summary(ctx: Any, world: Any, route: Any) -> Dict[str, Any]:
    """plan.yaml: what the steps recorded (their outputs, as in a real run's record) and every call in order;
    `route` is the backend's route module (pipeline_job or finetuning_job), chosen once."""
    cfg, record = ctx.cfg, ctx.record
    finetune = record.output("finetune") or {}
    model = record.output("model") or {}
    deploy = record.output("deploy") or {}
    warnings = list(model.get("warnings") or []) + world.warnings
    b = cfg.backend
    summary = {
        "backend": "azureml",
        "steps": [s for s in record.data.get("steps", {}) if s != "plan"],
        "display_name": finetune.get("display_name"),
        "experiment_name": finetune.get("experiment_name", b.experiment_name),
        "workspace": {"config_path": b.config_path, "subscription_id": "set" if b.subscription_id else "unset",
                      "resource_group": b.resource_group, "workspace_name": b.workspace_name,
                      "registry_name": b.registry_name},
        "model": {**(model.get("facts") or {}),
                  "answered_by": "the model preset (a real run asks the registry)"},
        "compute": {**(record.output("compute") or {}), "tier": cfg.compute.tier,
                    "low_priority_fallback": cfg.compute.low_priority_fallback},
        "component": {"reference": None, "version": finetune.get("component_version"),
                      "spec": str(world.component_spec_path)},
        "finetune": {
            "merge_order": "config -> model_specific_defaults -> explicit finetune.* overrides",
            "explicit_overrides": finetune.get("explicit_overrides", []),
            "merge_notes": finetune.get("merge_notes", []),
            "effective_params": finetune.get("effective_params", {}),
            "component_inputs": finetune.get("inputs", {}),
            "route": cfg.finetune.route,
            **route.plan_fields(finetune),
        },
        "evaluate": record.output("evaluate") or {},
        "register": record.output("register") or {},
        "endpoint": {**deploy, "instance_type": cfg.deployment.instance_type,
                     "instance_count": cfg.deployment.instance_count},
        "cleanup": record.output("cleanup") or {},
        "warnings": warnings,
        "calls": world.recorder.calls,
        "files": dict(world.recorder.files),
    }
    job_file = world.recorder.files.get("pipeline_job")
    if job_file:
        import yaml

        from runner.azureml.translate import NODE_NAME

        summary["component"]["reference"] = yaml.safe_load(Path(job_file).read_text())["jobs"][NODE_NAME]["component"]
    plan_file = write_yaml(ctx.plan_dir / "plan.yaml", summary)
    for w in warnings:
        print(f"  WARNING: {w}")
    for kind, path in world.recorder.files.items():
        print(f"  {kind:<13} {path}")
    return {"plan": str(plan_file), "display_name": summary["display_name"], "warnings": warnings,
            **world.recorder.files}
