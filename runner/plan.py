"""dry_run for the local backend: what the run would do, written to `<run dir>/plan/`, with nothing executed.

No network, credentials, model building or training; imports stay light (no torch, transformers or mlflow).
"""

from pathlib import Path
from typing import Any, Dict

from omegaconf import OmegaConf

from runner.atomic import write_json, write_text

# Used for request.json when the sample split is not on disk yet (a dry run downloads nothing).
EXAMPLE_CONVERSATION = [
    {"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."},
]


def planned_request(ctx) -> Dict[str, Any]:
    """The sample request the test step would send: a seeded row of the sample split when it is on disk."""
    from runner.workflow import sample_file

    parameters = OmegaConf.to_container(ctx.cfg.deployment.sample_parameters, resolve=True)
    source = sample_file(ctx)
    if source.exists():
        from runner.data.sample_request import build_sample_request

        return build_sample_request(source, ctx.cfg.seed, parameters)
    return {"input_data": {"input_string": [EXAMPLE_CONVERSATION], "parameters": parameters}, "params": {}}


def write_request(ctx) -> Path:
    path = ctx.plan_dir / "request.json"
    write_json(path, planned_request(ctx))
    return path


def write_local_plan(ctx, backend) -> Dict[str, Any]:
    cfg = ctx.cfg
    params, notes = backend.effective_params(ctx)
    model = cfg.model
    if model.local_path:
        source = f"local folder {model.local_path}"
    elif model.build_tiny:
        source = f"offline tiny Phi-3 built into {cfg.paths.models_dir} (cached by its dimensions)"
    else:
        source = f"hub {model.hf_id}"
    data_dir = Path(cfg.dataset.download_dir)
    plan = {
        "backend": "local",
        "steps": [s for s in cfg.steps],
        "display_name": ctx.display_name(backend.display_name(params)),
        "model": {"name": model.name, "source": source, "trust_remote_code": model.trust_remote_code},
        "compute": {
            "device": cfg.compute.device,
            "gpus": cfg.compute.gpus_per_node,
            "checks": "CUDA for DeepSpeed/16-bit, GPU count, weights + optimizer state vs free memory",
        },
        "data": {
            "source": cfg.dataset.source,
            "name": cfg.dataset.name,
            "split_percent": cfg.dataset.split_percent,
            "files": {s: str(data_dir / f"{s}.jsonl") for s in cfg.dataset.splits},
            "train": cfg.dataset.train_split,
            "test": cfg.dataset.test_split,
        },
        "finetune": {"params": params, "merge_notes": notes,
                     "local": OmegaConf.to_container(cfg.finetune.local, resolve=True)},
        "mlflow": OmegaConf.to_container(cfg.mlflow, resolve=True),
        "endpoint": {
            "name_prefix": cfg.deployment.endpoint_name_prefix,
            "traffic": OmegaConf.to_container(cfg.deployment.traffic),
            "host": cfg.deployment.host,
            "port": cfg.deployment.port or "a free port",
            "auth_mode": cfg.deployment.auth_mode,
            "request_timeout_ms": cfg.deployment.request_timeout_ms,
        },
    }
    ctx.plan_dir.mkdir(parents=True, exist_ok=True)
    plan_file = ctx.plan_dir / "plan.yaml"
    write_text(plan_file, OmegaConf.to_yaml(OmegaConf.create(plan)))
    request = write_request(ctx)
    print(OmegaConf.to_yaml(OmegaConf.create(plan)))
    return {"plan": str(plan_file), "request": str(request), "display_name": plan["display_name"]}
