"""The local `compute` step: which device trains, and whether the requested fine-tune can run on it at all.

Everything here is decided before a weight is loaded: the parameter inventory comes from the safetensors headers
(names and shapes, a few KB read per file) or, without them, from config.json arithmetic; the memory comes from
/proc/meminfo (psutil when present) or torch.cuda.mem_get_info. Impossible settings raise ComputeError naming the
config key and what would be right, so a run fails in a second instead of after minutes of loading.
"""

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from runner.errors import RunnerError

GB = 1e9  # decimal GB: what nvidia-smi/free-style figures and the estimates in messages use

# Architectures whose MLP is a plain up/down pair (no gate); every other model type is assumed gated (SwiGLU-style,
# Llama/Mistral/Phi-3/Qwen), which is what current chat models use.
_UNGATED_TYPES = {"gpt2", "gpt_neox", "gptj", "opt", "phi", "falcon", "bloom", "gpt_bigcode", "mpt", "codegen"}
# Weight names of the embeddings and the output head: never LoRA targets, the usual modules_to_save.
_NOT_LINEAR = ("embed", "wte", "wpe", "lm_head", "embed_out", "word_embeddings", "position_embeddings")


class ComputeError(RunnerError):
    """A compute setting that cannot work on this machine (message: what, why, what would be right, which key)."""


# ---- parameter inventory -------------------------------------------------------------------------------------------
def _safetensors_shapes(model_dir: Path) -> Optional[Dict[str, Tuple[int, ...]]]:
    """Tensor name -> shape from the safetensors headers alone (8-byte length + JSON), no weights read."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        return None
    shapes: Dict[str, Tuple[int, ...]] = {}
    for file in files:
        with open(file, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        for name, meta in header.items():
            if name != "__metadata__":
                shapes[name] = tuple(int(d) for d in meta["shape"])
    return shapes


def _first(cfg: Dict[str, Any], *keys, default=None):
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def _config_shapes(cfg: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """Tensor name -> shape of a decoder-only transformer described by config.json (Llama-style names; Phi-3's
    fused qkv_proj/gate_up_proj). Biases are left out: they are a rounding error in the estimate."""
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    h = _first(cfg, "hidden_size", "n_embd", "d_model")
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    vocab = _first(cfg, "vocab_size")
    if not (h and layers and vocab):
        raise ComputeError("config.json lacks hidden_size / num_hidden_layers / vocab_size, so the model's size "
                           "cannot be estimated; save the model with save_pretrained (config.json + *.safetensors)")
    heads = _first(cfg, "num_attention_heads", "n_head", default=1)
    kv_heads = _first(cfg, "num_key_value_heads", default=heads)
    head_dim = _first(cfg, "head_dim", default=h // heads)
    inter = _first(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * h)
    experts = _first(cfg, "num_local_experts", "num_experts", default=1)
    model_type = cfg.get("model_type", "")
    gated = model_type not in _UNGATED_TYPES
    fused = model_type == "phi3"
    q_out, kv_out = heads * head_dim, kv_heads * head_dim

    shapes: Dict[str, Tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    if not cfg.get("tie_word_embeddings", True):  # transformers' default is tied
        shapes["lm_head.weight"] = (vocab, h)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if fused:
            shapes[p + "self_attn.qkv_proj.weight"] = (q_out + 2 * kv_out, h)
        else:
            shapes[p + "self_attn.q_proj.weight"] = (q_out, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv_out, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv_out, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_out)
        for e in range(experts):
            m = p + (f"mlp.experts.{e}." if experts > 1 else "mlp.")
            if gated and fused:
                shapes[m + "gate_up_proj.weight"] = (2 * inter, h)
            elif gated:
                shapes[m + "gate_proj.weight"] = (inter, h)
                shapes[m + "up_proj.weight"] = (inter, h)
            else:
                shapes[m + "up_proj.weight"] = (inter, h)
            shapes[m + "down_proj.weight"] = (h, inter)
        if experts > 1:
            shapes[p + "mlp.gate.weight"] = (experts, h)
    return shapes


def _numel(shape: Tuple[int, ...]) -> int:
    return math.prod(shape) if shape else 1


def _matches(module: str, targets: List[str]) -> bool:
    """PEFT's rule for a target name: the whole module path or its last dotted components."""
    return any(module == t or module.endswith("." + t) for t in targets)


def parameter_inventory(model_dir: str) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, Any], str]:
    """(tensor name -> shape, config.json, source) for a Hugging Face model folder, without loading weights."""
    folder = Path(model_dir)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ComputeError(f"{folder} has no config.json: the model step must produce a Hugging Face model folder "
                           "(save_pretrained); check model.path / model.name")
    cfg = json.loads(config_file.read_text(encoding="utf-8"))
    shapes = _safetensors_shapes(folder)
    if shapes:
        return shapes, cfg, "safetensors headers"
    return _config_shapes(cfg), cfg, "config.json"


# ---- memory estimate ----------------------------------------------------------------------------------------------
def base_weights_dtype(params: Dict[str, Any], local: Dict[str, Any], precision: Dict[str, bool]) -> str:
    """The dtype the base model loads in. LoRA in 16-bit mixed precision without DeepSpeed: the frozen base in that
    16-bit type (half its memory; PEFT keeps the adapters in fp32 and autocast does the rest). Everything else
    loads fp32: full fine-tuning under AMP needs fp32 weights to update, DeepSpeed casts the module itself, and
    modules_to_save become trainable copies of base modules, which must not be 16-bit under AdamW."""
    half = precision.get("bf16") or precision.get("fp16")
    if (half and params.get("apply_lora") and not params.get("apply_deepspeed")
            and not list(local.get("lora_modules_to_save") or [])):
        return "bfloat16" if precision.get("bf16") else "float16"
    return "float32"


def estimate_memory(
    shapes: Dict[str, Tuple[int, ...]],
    cfg: Dict[str, Any],
    params: Dict[str, Any],
    *,
    apply_lora: bool,
    lora_target_modules: Optional[List[str]] = None,
    lora_modules_to_save: Optional[List[str]] = None,
    shards: int = 1,
) -> Dict[str, Any]:
    """Bytes of weights, gradients and optimizer state (per device) for full or LoRA fine-tuning, plus a rough
    activation figure. Mixed-precision accounting as in the ZeRO paper: full fine-tuning costs 16 bytes per
    parameter (weights + grads + fp32 master copy + two fp32 AdamW moments) whatever the precision.
    Weights are counted in the dtype the trainer holds them in: the load dtype (base_weights_dtype), or 16-bit
    under DeepSpeed, which casts the module."""
    half = int(params.get("precision", 32)) == 16
    deepspeed = bool(params.get("apply_deepspeed"))
    abytes = 2 if half else 4  # activations follow autocast
    total = sum(_numel(s) for s in shapes.values())
    linears = {n[: -len(".weight")]: s for n, s in shapes.items()
               if n.endswith(".weight") and len(s) == 2 and not any(k in n for k in _NOT_LINEAR)}
    notes: List[str] = []

    if apply_lora:
        r = int(params.get("lora_r", 8))
        targets = list(lora_target_modules or [])
        chosen = {m: s for m, s in linears.items() if _matches(m, targets)} if targets else dict(linears)
        if targets and not chosen:
            notes.append(f"no linear layer matches lora_target_modules={targets}; estimated as if all were targeted")
            chosen = dict(linears)
        adapters = sum(r * (s[0] + s[1]) for s in chosen.values())
        saved = sum(_numel(s) for n, s in shapes.items()
                    if lora_modules_to_save and _matches(n.rsplit(".", 1)[0], list(lora_modules_to_save)))
        trainable = adapters + saved
        # frozen base in the load dtype; adapters are fp32 (PEFT upcasts them); modules_to_save are trained copies
        loads_16bit = base_weights_dtype({**params, "apply_lora": True}, {"lora_modules_to_save": lora_modules_to_save},
                                         {"bf16": half, "fp16": False}) != "float32"
        wbytes = 2 if half and (deepspeed or loads_16bit) else 4
        weights = total * wbytes + adapters * 4 + saved * wbytes
        gradients = adapters * 4 + saved * wbytes
        master = saved * 4 if wbytes == 2 else 0
    else:
        trainable = total
        wbytes = 2 if half and deepspeed else 4  # plain AMP keeps fp32 weights and grads: no separate master copy
        weights, gradients = total * wbytes, total * wbytes
        master = total * 4 if wbytes == 2 else 0

    if str(params.get("optim", "adamw_torch")) == "adafactor":
        # factored second moment: one row and one column vector per matrix, no first moment (HF defaults)
        def factored(s):
            return (s[0] + s[1]) if len(s) == 2 else _numel(s)
        if apply_lora:  # adapters A (r x in) and B (out x r), plus the saved modules
            opt_elems = sum((r + s[1]) + (s[0] + r) for s in chosen.values()) + saved
        else:
            opt_elems = sum(factored(s) for s in shapes.values())
        optimizer = opt_elems * 4 + master
    else:
        optimizer = trainable * 8 + master  # AdamW: exp_avg + exp_avg_sq in fp32

    # DeepSpeed ZeRO shards optimizer state and gradients (stage 2) and also the weights (stage 3) across GPUs.
    if params.get("apply_deepspeed") and shards > 1:
        stage = int(params.get("deepspeed_stage", 2))
        optimizer, gradients = optimizer / shards, gradients / shards
        if stage >= 3:
            weights = weights / shards

    hidden = _first(cfg, "hidden_size", "n_embd", "d_model", default=0) or 0
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers", default=0) or 0
    vocab = cfg.get("vocab_size", 0) or 0
    seq = int(params.get("max_seq_length", -1) or -1)
    if seq <= 0:
        seq = int(_first(cfg, "max_position_embeddings", "n_positions", default=2048))
    tokens = int(params.get("per_device_train_batch_size", 1) or 1) * seq
    # Rough, without gradient checkpointing, fused (SDPA) attention: ~18 saved values per hidden unit per layer,
    # plus the fp32 logits and their gradient.
    activations = tokens * (layers * hidden * 18 * abytes + vocab * 8)

    state = weights + gradients + optimizer
    return {
        "params_total": int(total),
        "params_trainable": int(trainable),
        "bytes": {"weights": weights, "gradients": gradients, "optimizer": optimizer,
                  "activations": activations, "state": state, "total": state + activations},
        "tokens_per_micro_batch": tokens,
        "notes": notes,
    }


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


def _gb(n: float) -> float:
    return round(n / GB, 3)


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


def check_local_compute(
    *,
    device: str,
    gpus_requested: int,
    params: Dict[str, Any],
    model_dir: str,
    memory_headroom: float = 0.9,
    available_memory_bytes: Optional[int] = None,
    cuda_devices: Optional[int] = None,
    lora_target_modules: Optional[List[str]] = None,
    lora_modules_to_save: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """Decide the device and refuse what cannot run here. `available_memory_bytes` / `cuda_devices` override what
    is detected (tests, or a user who knows better); `lora_*` default to every linear layer / nothing saved."""
    if device not in ("auto", "cpu", "cuda"):
        raise ComputeError(f"compute.device={device!r} is not one of auto, cpu, cuda")
    if not (0.0 < memory_headroom <= 1.0):
        raise ComputeError(f"compute.memory_headroom={memory_headroom} must be in (0, 1]: the fraction of free "
                           "memory the weights and optimizer state may take")
    gpus_requested = int(gpus_requested or 0)
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

    gpus_used = (gpus_requested or cuda_devices) if on_cuda else 0
    if available_memory_bytes is None:
        available_memory_bytes = cuda_memory_available(gpus_used) if on_cuda else system_memory_available()
    budget = available_memory_bytes * memory_headroom

    shapes, cfg, source = parameter_inventory(model_dir)
    apply_lora = bool(params.get("apply_lora", False))
    lora_kw = dict(lora_target_modules=lora_target_modules, lora_modules_to_save=lora_modules_to_save,
                   shards=max(gpus_used, 1))
    est = estimate_memory(shapes, cfg, params, apply_lora=apply_lora, **lora_kw)
    b = est["bytes"]
    where = f"{gpus_used} GPU(s), per GPU" if on_cuda else "system RAM"
    if b["state"] > budget:
        mode = "LoRA" if apply_lora else "full"
        hint = []
        if not apply_lora:
            lora = estimate_memory(shapes, cfg, params, apply_lora=True, **lora_kw)["bytes"]["state"]
            hint.append(f"finetune.apply_lora=true (~{_gb(lora):.1f} GB)")
        if on_cuda and not params.get("apply_deepspeed") and gpus_used > 1:
            hint.append("finetune.apply_deepspeed=true to shard optimizer state across the GPUs")
        if on_cuda and gpus_used < cuda_devices:
            hint.append(f"compute.gpus_per_node={cuda_devices} with DeepSpeed")
        hint.append("a smaller model (model=...)")
        raise ComputeError(
            f"{mode} fine-tuning of {model_dir} ({est['params_total'] / 1e9:.3g}B parameters, "
            f"{est['params_trainable'] / 1e6:.4g}M trainable) needs ~{_gb(b['state']):.1f} GB for weights "
            f"({_gb(b['weights']):.1f}) + gradients ({_gb(b['gradients']):.1f}) + optimizer state "
            f"({_gb(b['optimizer']):.1f}), but only {_gb(budget):.1f} GB may be used ({where}: "
            f"{_gb(available_memory_bytes):.1f} GB available x compute.memory_headroom={memory_headroom}); "
            f"try {' or '.join(hint)}"
        )
    warnings = list(est["notes"])
    if b["total"] > budget:
        warnings.append(
            f"activations (~{_gb(b['activations']):.1f} GB for {est['tokens_per_micro_batch']} tokens per "
            f"micro-batch) may not fit next to the {_gb(b['state']):.1f} GB of weights and optimizer state; lower "
            "finetune.per_device_train_batch_size or finetune.max_seq_length if training runs out of memory"
        )
    return {
        "device": resolved,
        "cuda_devices": int(cuda_devices),
        "gpus_used": int(gpus_used),
        "memory_available_gb": _gb(available_memory_bytes),
        "memory_budget_gb": _gb(budget),
        "estimate_gb": {k: _gb(b[k]) for k in ("weights", "gradients", "optimizer", "activations", "total")},
        "mode": "lora" if apply_lora else "full",
        "params_total": est["params_total"],
        "params_trainable": est["params_trainable"],
        "params_source": source,
        "warnings": warnings,
    }
