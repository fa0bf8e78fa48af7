"""The local `compute` step: which device trains, and whether the requested fine-tune can run on it at all.

Everything here is decided before a weight is loaded: the parameter inventory comes from the safetensors headers
(names and shapes, a few KB read per file) or, without them, from config.json arithmetic; the memory comes from
/proc/meminfo (psutil when present) or torch.cuda.mem_get_info. Impossible settings raise ComputeError naming the
config key and what would be right, so a run fails in a second instead of after minutes of loading.
"""

import os
from typing import Any, Dict, List, Optional

from runner.errors import ComputeError  # noqa: F401  (raised here; its home is runner/errors.py)
from runner.memory.estimate import estimate_memory, gb, memory_verdict, parameter_inventory, config_shapes
from runner.memory.terms import gpu_memory_bytes, micro_batch_tokens, use_gradient_checkpointing

# ---- the machine ----------------------------------------------------------------------------------------------
def system_memory_available() -> int:
    """Bytes of RAM available to a new process (MemAvailable, which counts reclaimable page cache)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def cuda_memory_available(devices: int) -> int:
    """Free bytes on the most loaded of the first `devices` GPUs (every rank must fit)."""
    import torch

    return min(int(torch.cuda.mem_get_info(i)[0]) for i in range(max(devices, 1)))


# ---- the step ---------------------------------------------------------------------------------------------------
def cpu_refusals(params: Dict[str, Any]) -> List[str]:
    """The finetune settings that need a GPU, for a run on the CPU. The compute step refuses them, and train()
    again since it may be called without that step; one list, so both say the same."""
    errors = []
    if params.get("apply_deepspeed"):
        errors.append("finetune.apply_deepspeed=true needs CUDA GPUs (DeepSpeed ZeRO runs on NCCL/GPUs), but "
                      "training would run on the CPU; set finetune.apply_deepspeed=false here")
    if int(params.get("precision", 32)) == 16:
        errors.append("finetune.precision=16 needs a CUDA GPU (fp16/bf16 mixed precision), but training would run "
                      "on the CPU; set finetune.precision=32 here")
    return errors


def gradient_checkpointing_for(model_dir: str, params: Dict[str, Any], local: Dict[str, Any], *,
                               available_bytes: float, memory_headroom: float = 0.9, shards: int = 1) -> bool:
    """The trainer's call when it runs without the compute step's decision: finetune.local.gradient_checkpointing
    resolved by the `auto` rule against `available_bytes` (torch.cuda.mem_get_info()[0] on the device)."""
    shapes, cfg, _ = parameter_inventory(model_dir)
    est = estimate_memory(shapes, cfg, params, apply_lora=bool(params.get("apply_lora")),
                          lora_target_modules=list(local.get("lora_target_modules") or []),
                          lora_modules_to_save=list(local.get("lora_modules_to_save") or []), shards=shards,
                          max_tokens_per_batch=int(local.get("max_tokens_per_batch") or 0),
                          chunked_loss=bool(local.get("chunked_loss"))
                          if local.get("packing", True) else 0)
    return use_gradient_checkpointing(local.get("gradient_checkpointing", "auto"), est["bytes"]["total"],
                                      available_bytes * memory_headroom)


def memory_plan(model_dir: Optional[str], params: Dict[str, Any], local: Dict[str, Any], *, device: str, gpus: int,
                gpu_memory_gb: float = 0, memory_headroom: float = 0.9,
                config: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The estimate a dry run writes (plan.yaml compute.memory_estimate): shapes from the safetensors headers or
    config.json only (no torch, no weights), against compute.gpu_memory_gb per GPU when set (a what-if, or the
    Azure SKU's size), the system RAM for compute.device=cpu, else no verdict (the GPU is measured at run time).
    `config` (a config.json as a dict) stands in for a folder that does not exist yet."""
    if model_dir is not None:
        shapes, cfg, source = parameter_inventory(model_dir)
    else:
        cfg = dict(config or {})
        shapes, source = config_shapes(cfg), "config (the model is not on this machine yet)"
    apply_lora = bool(params.get("apply_lora", False))
    max_tokens = int(local.get("max_tokens_per_batch") or 0) if local.get("packing", True) else 0
    gpus = max(int(gpus or 0), 1)
    gpu = bool(gpu_memory_gb and gpu_memory_gb > 0)
    est = estimate_memory(shapes, cfg, params, apply_lora=apply_lora,
                          lora_target_modules=list(local.get("lora_target_modules") or []),
                          lora_modules_to_save=list(local.get("lora_modules_to_save") or []),
                          shards=gpus if gpu or device != "cpu" else 1, max_tokens_per_batch=max_tokens,
                          chunked_loss=bool(local.get("chunked_loss")))
    b = est["bytes"]
    out: Dict[str, Any] = {
        "model_dir": str(model_dir) if model_dir is not None else None,
        "shapes_from": source,
        "mode": "lora" if apply_lora else "full",
        "params_total": est["params_total"],
        "params_trainable": est["params_trainable"],
        "tokens_per_micro_batch": est["tokens_per_micro_batch"],
        "bytes": {k: int(round(v)) for k, v in b.items()},
        "bytes_per_token": {"without_checkpointing": int(round(est["bytes_per_token"]["without_checkpointing"])),
                            "with_checkpointing": int(round(est["bytes_per_token"]["with_checkpointing"])),
                            "terms": {k: int(round(v)) for k, v in est["bytes_per_token"]["terms"].items()}},
        "total_gb": gb(b["total"]),
        "total_gb_with_checkpointing": gb(b["total_checkpointed"]),
    }
    if gpu:
        capacity, where = gpu_memory_bytes(gpu_memory_gb), f"compute.gpu_memory_gb={gpu_memory_gb} GiB per GPU"
    elif device == "cpu":
        capacity, where = system_memory_available(), "system RAM available now"
    else:
        out.update(target="the local GPU (measured by the compute step at run time)", fits=None,
                   note="set compute.gpu_memory_gb=N for a what-if against an N GB GPU")
        return out
    budget = capacity * memory_headroom
    verdict = memory_verdict(est, params, budget_bytes=budget, where=where,
                             checkpointing=local.get("gradient_checkpointing", "auto"), max_tokens_per_batch=max_tokens,
                             packing=bool(local.get("packing", True)))
    state_fits = b["state"] <= budget
    out.update(target=where, budget_gb=gb(budget), fits=bool(verdict["fits"] and state_fits),
               gradient_checkpointing=bool(verdict["run"]["gradient_checkpointing"]), fit=verdict["summary"],
               message=verdict["message"] if state_fits else (
                   f"weights + gradients + optimizer state alone need ~{gb(b['state']):.1f} GB of "
                   f"{gb(budget):.1f} GB ({where})"))
    if not verdict["fits"] and verdict["auto_fit"]:
        a = verdict["auto_fit"]
        out["auto_fit"] = {"per_device_train_batch_size": a["per_device_train_batch_size"],
                           "gradient_accumulation_steps": a["gradient_accumulation_steps"],
                           "gradient_checkpointing": a["gradient_checkpointing"], "total_gb": gb(a["total_bytes"])}
    return out


def check_local_compute(
    *, device: str, gpus_requested: int, params: Dict[str, Any], model_dir: str, memory_headroom: float = 0.9,
    available_memory_bytes: Optional[int] = None, cuda_devices: Optional[int] = None,
    lora_target_modules: Optional[List[str]] = None, lora_modules_to_save: Optional[List[str]] = None,
    gradient_checkpointing: Any = "auto", auto_fit: bool = False, max_tokens_per_batch: int = 0,
    gpu_memory_gb: float = 0, packing: bool = False, chunked_loss: bool = False,
) -> Dict[str, Any]:
    """Decide the device and refuse what cannot run here. `available_memory_bytes` / `cuda_devices` override what
    is detected (tests, or a user who knows better); `lora_*` default to every linear layer / nothing saved.
    `gpu_memory_gb` (compute.gpu_memory_gb, nominal GiB per GPU) replaces the detected GPU memory: a what-if.

    Then the micro-batch (memory_verdict): gradient checkpointing decided by the `auto` rule, and a micro-batch
    that does not fit refused on a GPU (a warning on the CPU) naming the largest that fits with and without
    checkpointing, or, with auto_fit, replaced by it. The outputs carry what the trainer must run:
    per_device_train_batch_size, gradient_accumulation_steps, gradient_checkpointing."""
    gpus_requested = int(gpus_requested or 0)
    resolved, on_cuda, cuda_devices = _check_device(device, gpus_requested, cuda_devices, params, memory_headroom)
    gpus_used = (gpus_requested or cuda_devices) if on_cuda else 0
    what_if = bool(on_cuda and gpu_memory_gb and gpu_memory_gb > 0)
    if what_if:
        available_memory_bytes = int(gpu_memory_bytes(gpu_memory_gb))
    elif available_memory_bytes is None:
        available_memory_bytes = cuda_memory_available(gpus_used) if on_cuda else system_memory_available()
    budget = available_memory_bytes * memory_headroom

    shapes, cfg, source = parameter_inventory(model_dir)
    apply_lora = bool(params.get("apply_lora", False))
    lora_kw = dict(lora_target_modules=lora_target_modules, lora_modules_to_save=lora_modules_to_save,
                   shards=max(gpus_used, 1), chunked_loss=chunked_loss)
    est = estimate_memory(shapes, cfg, params, apply_lora=apply_lora, max_tokens_per_batch=max_tokens_per_batch,
                          **lora_kw)
    b = est["bytes"]
    where = f"{gpus_used} GPU(s), per GPU" if on_cuda else "system RAM"
    if what_if:
        where += f", compute.gpu_memory_gb={gpu_memory_gb} GiB"
    if b["state"] > budget:
        _refuse_state(est, budget, model_dir=model_dir, where=where, on_cuda=on_cuda, gpus_used=gpus_used,
                      cuda_devices=cuda_devices, available=available_memory_bytes, memory_headroom=memory_headroom,
                      params=params, lora_state=lambda: estimate_memory(shapes, cfg, params, apply_lora=True,
                                                                        **lora_kw)["bytes"]["state"])
    warnings = list(est["notes"])
    if gpu_memory_gb and gpu_memory_gb > 0 and not what_if:
        warnings.append(f"compute.gpu_memory_gb={gpu_memory_gb} is a GPU what-if, but training runs on the CPU here: "
                        "checked against system RAM")
    verdict = memory_verdict(est, params, budget_bytes=budget, where=where, checkpointing=gradient_checkpointing,
                             max_tokens_per_batch=max_tokens_per_batch, packing=packing)
    if not verdict["fits"] and not (auto_fit and verdict["auto_fit"]):
        if on_cuda:
            raise ComputeError(verdict["message"])
        warnings.append(verdict["message"])  # system RAM: swap may carry it; say so, do not refuse
    applied = bool(auto_fit and not verdict["fits"] and verdict["auto_fit"])
    run = verdict["auto_fit"] if applied else verdict["run"]
    chosen = estimate_memory(shapes, cfg, {**params, "per_device_train_batch_size":
                                           run["per_device_train_batch_size"]},
                             apply_lora=apply_lora, max_tokens_per_batch=max_tokens_per_batch, **lora_kw)["bytes"]
    return {
        "device": resolved,
        "cuda_devices": int(cuda_devices),
        "gpus_used": int(gpus_used),
        "memory_available_gb": gb(available_memory_bytes),
        "memory_budget_gb": gb(budget),
        "memory_what_if_gpu_gb": gpu_memory_gb if what_if else None,
        "estimate_gb": _estimate_gb(b, chosen, bool(run["gradient_checkpointing"])),
        "tokens_per_micro_batch": micro_batch_tokens(run["per_device_train_batch_size"], est["max_seq_length"],
                                                     max_tokens_per_batch),
        "mode": "lora" if apply_lora else "full",
        "params_total": est["params_total"],
        "params_trainable": est["params_trainable"],
        "params_source": source,
        # what the finetune step must run (auto_fit may have changed the first two; the third is the auto rule's)
        "per_device_train_batch_size": int(run["per_device_train_batch_size"]),
        "gradient_accumulation_steps": int(run["gradient_accumulation_steps"]),
        "gradient_checkpointing": bool(run["gradient_checkpointing"]),
        "auto_fit_applied": applied,
        "memory_fit": verdict["summary"],
        "memory_message": verdict["message"],
        "warnings": warnings,
    }


def _estimate_gb(configured: Dict[str, float], chosen: Dict[str, float], checkpointing: bool) -> Dict[str, float]:
    """The outputs' estimate: the configured state, the activations of the micro-batch that runs."""
    activations = chosen["activations_checkpointed"] if checkpointing else chosen["activations"]
    estimate = {k: gb(configured[k]) for k in ("weights", "gradients", "optimizer")}
    estimate.update(activations=gb(activations), total=gb(chosen["state"] + activations),
                    total_without_checkpointing=gb(chosen["total"]),
                    total_with_checkpointing=gb(chosen["total_checkpointed"]))
    return estimate


def _check_device(device: str, gpus_requested: int, cuda_devices: Optional[int], params: Dict[str, Any],
                  memory_headroom: float) -> tuple:
    """(the device that trains, whether it is CUDA, CUDA devices seen); ComputeError for what cannot run here."""
    if device not in ("auto", "cpu", "cuda"):
        raise ComputeError(f"compute.device={device!r} is not one of auto, cpu, cuda")
    if not (0.0 < memory_headroom <= 1.0):
        raise ComputeError(f"compute.memory_headroom={memory_headroom} must be in (0, 1]: the fraction of free "
                           "memory the weights and optimizer state may take")
    if cuda_devices is None:
        cuda_devices = 0 if device == "cpu" and not gpus_requested else cuda_device_count()

    errors: List[str] = []
    if device == "cuda" and cuda_devices == 0:
        errors.append("compute.device=cuda but no CUDA device is visible on this machine (torch sees 0 GPUs); "
                      "use compute=local_cpu (compute.device=cpu) or run on a GPU machine")
    if device == "cpu" and gpus_requested > 0:
        errors.append(f"compute.gpus_per_node={gpus_requested} contradicts compute.device=cpu; set "
                      "compute.gpus_per_node=0 for CPU training or compute.device=cuda to use GPUs")
    elif gpus_requested > cuda_devices:
        errors.append(f"compute.gpus_per_node={gpus_requested} asks for more GPUs than the {cuda_devices} CUDA "
                      f"device(s) present; set compute.gpus_per_node to at most {cuda_devices} (0 = all visible)")
    resolved = "cuda" if device == "cuda" or (device == "auto" and cuda_devices > 0) else "cpu"
    on_cuda = resolved == "cuda" and cuda_devices > 0
    if not on_cuda:
        errors += cpu_refusals(params)
    if int(params.get("num_nodes_finetune", 1) or 1) > 1:
        errors.append(f"finetune.num_nodes_finetune={params.get('num_nodes_finetune')} but the local backend is "
                      "this one machine; set finetune.num_nodes_finetune=1 (multi-node needs backend=azureml)")
    if errors:
        raise ComputeError("compute check failed:\n  - " + "\n  - ".join(errors))
    return resolved, on_cuda, cuda_devices


def _refuse_state(est: Dict[str, Any], budget: float, *, model_dir: str, where: str, on_cuda: bool, gpus_used: int,
                  cuda_devices: int, available: float, memory_headroom: float, lora_state, params: Dict[str, Any]):
    """ComputeError: weights + gradients + optimizer state alone exceed the budget; the message names what helps."""
    b = est["bytes"]
    apply_lora = bool(params.get("apply_lora", False))
    mode = "LoRA" if apply_lora else "full"
    hint = []
    if not apply_lora:
        lora = lora_state()
        hint.append(f"finetune.apply_lora=true (~{gb(lora):.1f} GB)")
    if on_cuda and not params.get("apply_deepspeed") and gpus_used > 1:
        hint.append("finetune.apply_deepspeed=true to shard optimizer state across the GPUs")
    if on_cuda and gpus_used < cuda_devices:
        hint.append(f"compute.gpus_per_node={cuda_devices} with DeepSpeed")
    hint.append("a smaller model (model=...)")
    raise ComputeError(
        f"{mode} fine-tuning of {model_dir} ({est['params_total'] / 1e9:.3g}B parameters, "
        f"{est['params_trainable'] / 1e6:.4g}M trainable) needs ~{gb(b['state']):.1f} GB for weights "
        f"({gb(b['weights']):.1f}) + gradients ({gb(b['gradients']):.1f}) + optimizer state "
        f"({gb(b['optimizer']):.1f}), but only {gb(budget):.1f} GB may be used ({where}: "
        f"{gb(available):.1f} GB available x compute.memory_headroom={memory_headroom}); "
        f"try {' or '.join(hint)}"
    )
