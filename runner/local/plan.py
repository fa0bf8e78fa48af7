"""dry_run for the local backend: what the run would do, written to `<run dir>/plan/`, with nothing executed.

No network, credentials, model building or training; imports stay light (no torch, transformers or mlflow).
"""

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from omegaconf import OmegaConf

from runner.atomic import write_json, write_text


def write_request(ctx) -> Path:
    path = ctx.plan_dir / "request.json"
    from runner.data.sample_request import sample_request  # the request the test step would send

    from runner.step_results import DataResult

    write_json(path, sample_request(ctx.cfg, DataResult.recorded(ctx.record).sample_file))
    return path


def _planned_model(cfg) -> Tuple[Optional[str], Optional[Dict[str, Any]], Optional[str]]:
    """(folder, config, why-not) for the estimate: model.local_path, the tiny model's folder (or its config from
    model.tiny when not built yet), the hub model's download folder; none of it loaded, built or downloaded."""
    model = cfg.model
    if model.local_path:
        return str(model.local_path), None, None
    if model.build_tiny:
        from runner.local.tiny_model import tiny_model_path

        tiny = OmegaConf.to_container(model.tiny, resolve=True)
        folder = tiny_model_path(cfg.paths.models_dir, tiny)
        if (folder / "config.json").is_file():
            return str(folder), None, None
        config = {"model_type": "phi3", "tie_word_embeddings": False,
                  "num_key_value_heads": tiny["num_attention_heads"],
                  **{k: tiny[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "vocab_size", "max_position_embeddings")}}
        return None, config, None
    if model.hf_id:
        folder = Path(cfg.paths.models_dir) / "hub" / model.hf_id.replace("/", "--")
        if (folder / "config.json").is_file():
            return str(folder), None, None
        return None, None, (f"{model.hf_id} is not on this machine yet (the model step downloads it); set "
                            "model.local_path=<a folder with its config.json> to estimate without downloading")
    return None, None, "no model.local_path, model.build_tiny or model.hf_id"


def planned_memory(cfg, params: Dict[str, Any]) -> Dict[str, Any]:
    """compute.memory_estimate: the compute step's estimate from config.json / safetensors headers only."""
    from runner.local.compute import ComputeError, memory_plan

    folder, config, why_not = _planned_model(cfg)
    if why_not:
        return {"skipped": why_not}
    try:
        return memory_plan(folder, params, OmegaConf.to_container(cfg.finetune.local, resolve=True),
                           device=cfg.compute.device, gpus=cfg.compute.gpus_per_node,
                           gpu_memory_gb=float(cfg.compute.get("gpu_memory_gb", 0) or 0),
                           memory_headroom=cfg.compute.memory_headroom, config=config)
    except ComputeError as exc:
        return {"error": str(exc)}


def planned_training(params: Dict[str, Any], cfg) -> Dict[str, Any]:
    from runner.errors import RunnerError
    from runner.local.translate import translate

    try:
        return translate(params, OmegaConf.to_container(cfg.finetune.local, resolve=True)).describe()
    except RunnerError as exc:  # the finetune step would refuse the same way: the plan says so
        return {"error": str(exc)}


def write_local_plan(ctx, backend) -> Dict[str, Any]:
    cfg = ctx.cfg
    effective = backend.finetune_params(ctx)
    params, notes = effective.params(), effective.note_list()
    model = cfg.model
    if model.local_path:
        source = f"local folder {model.local_path}"
    elif model.build_tiny:
        source = f"offline tiny Phi-3 built into {cfg.paths.models_dir} (cached by its dimensions)"
    else:
        source = f"hub {model.hf_id}"
    data_dir = Path(cfg.dataset.download_dir)
    memory_estimate = planned_memory(cfg, params)
    plan = {
        "backend": "local",
        "steps": [s for s in cfg.steps],
        "display_name": ctx.display_name(backend.display_name(params)),
        "model": {"name": model.name, "source": source, "trust_remote_code": model.trust_remote_code},
        "compute": {
            "device": cfg.compute.device,
            "gpus": cfg.compute.gpus_per_node,
            "checks": "CUDA for DeepSpeed/16-bit, GPU count, weights + optimizer state vs free memory, the "
                      "micro-batch's peak (gradient checkpointing auto, finetune.local.auto_fit)",
            "memory_estimate": memory_estimate,
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
                     "local": OmegaConf.to_container(cfg.finetune.local, resolve=True),
                     # what the finetune step hands the trainer: the same translate, run here without torch
                     "training": planned_training(params, cfg)},
        "evaluate": {  # runner/local/evaluation_run.py: base vs fine-tuned, in this process, on these rows
            "rows": cfg.evaluate.file or str(data_dir / f"{cfg.dataset.test_split}.jsonl"),
            **{k: v for k, v in OmegaConf.to_container(cfg.evaluate, resolve=True).items()
               if k not in ("file", "azureml_environment")},
            "gate": cfg.register.require_improvement,
            "outputs": str(ctx.run_dir / "evaluate"),
        },
        "mlflow": OmegaConf.to_container(cfg.mlflow, resolve=True),
        # the export step: which model (the version register makes, unless export.model), what, and where
        "export": {"model": cfg.export.model or f"the version of {cfg.mlflow.registered_model_name} the register "
                                                "step makes (or from_run's)",
                   "formats": list(cfg.export.formats), "out_dir": cfg.export.output_dir or "<run dir>/export",
                   "converter": cfg.export.converter or "the pinned llama-cpp-python sdist, fetched with pip"},
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
    if memory_estimate.get("message"):
        print(f"memory: {memory_estimate['message']}", flush=True)
    return {"plan": str(plan_file), "request": str(request), "display_name": plan["display_name"]}
