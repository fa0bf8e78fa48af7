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
from runner.local.memory import (activation_terms, checkpointed_terms, describe_option, fit_micro_batch,
                                  gpu_memory_bytes, micro_batch_tokens, model_dims,
                                  use_gradient_checkpointing)

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
    max_tokens_per_batch: int = 0,
    tokens: Optional[int] = None,
    chunked_loss: bool = False,
) -> Dict[str, Any]:
    """Bytes of weights, gradients and optimizer state (per device) for full or LoRA fine-tuning, plus the
    activations of the worst-case micro-batch (or of `tokens` tokens) with and without gradient checkpointing.
    Mixed-precision accounting as in the ZeRO paper: full fine-tuning costs 16 bytes per
    parameter (weights + grads + fp32 master copy + two fp32 AdamW moments) whatever the precision.
    Weights are counted in the dtype the trainer holds them in: the load dtype (base_weights_dtype), or 16-bit
    under DeepSpeed, which casts the module."""
    half = int(params.get("precision", 32)) == 16
    deepspeed = bool(params.get("apply_deepspeed"))
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

    # Activations: per-token terms from the architecture (runner/local/memory.py documents each), at the worst-case
    # micro-batch (batch size x max_seq_length, capped by max_tokens_per_batch), with and without checkpointing.
    dims = model_dims(cfg)
    seq = int(params.get("max_seq_length", -1) or -1)
    if seq <= 0:
        seq = dims["max_positions"]
    if tokens is None:
        tokens = micro_batch_tokens(int(params.get("per_device_train_batch_size", 1) or 1), seq, max_tokens_per_batch)
    if apply_lora:
        trained = [(m, int(s[1])) for m, s in chosen.items()]
    else:
        trained = [(m, int(s[1])) for m, s in linears.items()]
    weights_16bit = wbytes == 2
    terms = activation_terms(dims, trained, lora=apply_lora, half=half, lora_r=int(params.get("lora_r", 8) or 8),
                             lora_dropout=float(params.get("lora_dropout", 0.0) or 0.0) if apply_lora else 0.0,
                             chunked_loss=chunked_loss, tokens=int(tokens))  # finetune.local.chunked_loss
    ckpt_terms = checkpointed_terms(terms, dims, weights_16bit=weights_16bit, lora=apply_lora)
    per_token, per_token_ckpt = sum(terms.values()), sum(ckpt_terms.values())
    activations = tokens * per_token
    activations_ckpt = tokens * per_token_ckpt

    state = weights + gradients + optimizer
    return {
        "params_total": int(total),
        "params_trainable": int(trainable),
        "bytes": {"weights": weights, "gradients": gradients, "optimizer": optimizer,
                  "activations": activations, "state": state, "total": state + activations,
                  "activations_checkpointed": activations_ckpt, "total_checkpointed": state + activations_ckpt},
        "tokens_per_micro_batch": int(tokens),
        "max_seq_length": int(seq),
        "bytes_per_token": {"without_checkpointing": per_token, "with_checkpointing": per_token_ckpt,
                            "terms": terms, "terms_checkpointed": ckpt_terms},
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


def memory_verdict(est: Dict[str, Any], params: Dict[str, Any], *, budget_bytes: float, where: str,
                   checkpointing: Any = "auto", max_tokens_per_batch: int = 0,
                   packing: bool = False) -> Dict[str, Any]:
    """Whether the configured micro-batch fits `budget_bytes`, what to run, and the message saying so.

    run: the configured batch with the auto rule's checkpointing decision (when it fits; else as configured);
    auto_fit: the largest micro-batch that fits as the checkpointing setting allows (None: nothing fits);
    message: for a micro-batch that does not fit, the largest that fits with and without checkpointing, each with
    the gradient accumulation keeping the effective batch, and the key that applies it; with packing, also the
    token cap (finetune.local.max_tokens_per_batch) that keeps every micro-batch under the budget without
    checkpointing (the worst case is batch x max_seq_length; most packed micro-batches hold far fewer tokens)."""
    b = est["bytes"]
    per = est["bytes_per_token"]
    seq = est["max_seq_length"]
    bs = int(params.get("per_device_train_batch_size", 1) or 1)
    accum = int(params.get("gradient_accumulation_steps", 1) or 1)
    fit = fit_micro_batch(state_bytes=b["state"], per_token_bytes=per["without_checkpointing"],
                          per_token_bytes_checkpointed=per["with_checkpointing"], budget_bytes=budget_bytes,
                          seq_len=seq, batch_size=bs, grad_accum=accum, checkpointing=checkpointing,
                          max_tokens_per_batch=max_tokens_per_batch)
    tokens = micro_batch_tokens(bs, seq, max_tokens_per_batch)
    without_gb, with_gb = _gb(b["state"] + tokens * per["without_checkpointing"]), _gb(
        b["state"] + tokens * per["with_checkpointing"])
    summary = {
        "tokens_per_micro_batch": tokens,
        "budget_gb": _gb(budget_bytes),
        "total_gb_without_checkpointing": without_gb,
        "total_gb_with_checkpointing": with_gb,
        "fits_without_checkpointing": fit["fits_without_checkpointing"],
        "fits_with_checkpointing": fit["fits_with_checkpointing"],
        "largest_without_checkpointing": _option(fit["without_checkpointing"]),
        "largest_with_checkpointing": _option(fit["with_checkpointing"]),
    }
    room = budget_bytes - b["state"]
    longest = int(room // per["without_checkpointing"]) if room > 0 else 0
    longest_ckpt = int(room // per["with_checkpointing"]) if room > 0 else 0
    cap = (f"; or, packed, finetune.local.max_tokens_per_batch={longest} keeps every micro-batch under the budget "
           "without checkpointing" if packing and seq <= longest < tokens else "")
    if fit["configured_fits"]:
        ckpt = fit["configured"]["gradient_checkpointing"]
        shape = f"{bs} x {seq}" + (f" capped at {tokens}" if tokens < bs * seq else "")
        message = (f"the micro-batch fits: {shape} tokens needs ~{with_gb if ckpt else without_gb:.1f} GB "
                   f"of {_gb(budget_bytes):.1f} GB ({where})"
                   + (f"; gradient checkpointing on (auto: ~{without_gb:.1f} GB without it{cap})"
                      if ckpt and str(checkpointing).lower() == "auto" else ""))
        return {"fits": True, "run": fit["configured"], "auto_fit": None, "message": message, "head": message,
                "longest_max_seq_length": None, "summary": summary}
    head = (
        f"the micro-batch does not fit: per_device_train_batch_size={bs} x max_seq_length={seq} = {tokens} tokens "
        f"needs ~{without_gb:.1f} GB without gradient checkpointing (~{with_gb:.1f} GB with it; weights + "
        f"optimizer state {_gb(b['state']):.1f} GB) but {_gb(budget_bytes):.1f} GB may be used ({where}). "
        f"Largest that fits without checkpointing: {describe_option(fit['without_checkpointing'])}; with "
        f"checkpointing: {describe_option(fit['with_checkpointing'])}"
    )
    if fit["choice"]:
        tail = ("set finetune.per_device_train_batch_size and finetune.gradient_accumulation_steps to one of these "
                "(finetune.local.gradient_checkpointing=true for the second), or finetune.local.auto_fit=true to "
                "apply the " + ("first" if fit["choice"]["gradient_checkpointing"] is False else "second"))
    elif fit["with_checkpointing"]:
        tail = (f"finetune.local.gradient_checkpointing=false allows none: set it to auto or true "
                f"(finetune.local.auto_fit=true then applies the second), or finetune.max_seq_length to at most "
                f"{longest}")
    else:
        tail = (f"set finetune.max_seq_length to at most {longest_ckpt} (with gradient checkpointing; {longest} "
                "without), or use more memory (a larger GPU, compute.memory_headroom)" if longest_ckpt > 0 else
                "the weights and optimizer state leave no room for activations")
    message = f"{head}; {tail}{cap}"
    return {"fits": False, "run": fit["configured"], "auto_fit": fit["choice"], "message": message,
            "head": head, "longest_max_seq_length": longest, "summary": summary}


def _option(opt: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    if not opt:
        return None
    return {"per_device_train_batch_size": opt["per_device_train_batch_size"],
            "gradient_accumulation_steps": opt["gradient_accumulation_steps"],
            "total_gb": _gb(opt["total_bytes"])}


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
        shapes, source = _config_shapes(cfg), "config (the model is not on this machine yet)"
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
        "total_gb": _gb(b["total"]),
        "total_gb_with_checkpointing": _gb(b["total_checkpointed"]),
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
    out.update(target=where, budget_gb=_gb(budget), fits=bool(verdict["fits"] and state_fits),
               gradient_checkpointing=bool(verdict["run"]["gradient_checkpointing"]), fit=verdict["summary"],
               message=verdict["message"] if state_fits else (
                   f"weights + gradients + optimizer state alone need ~{_gb(b['state']):.1f} GB of "
                   f"{_gb(budget):.1f} GB ({where})"))
    if not verdict["fits"] and verdict["auto_fit"]:
        a = verdict["auto_fit"]
        out["auto_fit"] = {"per_device_train_batch_size": a["per_device_train_batch_size"],
                           "gradient_accumulation_steps": a["gradient_accumulation_steps"],
                           "gradient_checkpointing": a["gradient_checkpointing"], "total_gb": _gb(a["total_bytes"])}
    return out


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
    gradient_checkpointing: Any = "auto",
    auto_fit: bool = False,
    max_tokens_per_batch: int = 0,
    gpu_memory_gb: float = 0,
    packing: bool = False,
    chunked_loss: bool = False,
) -> Dict[str, Any]:
    """Decide the device and refuse what cannot run here. `available_memory_bytes` / `cuda_devices` override what
    is detected (tests, or a user who knows better); `lora_*` default to every linear layer / nothing saved.
    `gpu_memory_gb` (compute.gpu_memory_gb, nominal GiB per GPU) replaces the detected GPU memory: a what-if.

    Then the micro-batch (memory_verdict): gradient checkpointing decided by the `auto` rule, and a micro-batch
    that does not fit refused on a GPU (a warning on the CPU) naming the largest that fits with and without
    checkpointing, or, with auto_fit, replaced by it. The outputs carry what the trainer must run:
    per_device_train_batch_size, gradient_accumulation_steps, gradient_checkpointing."""
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
    if gpu_memory_gb and gpu_memory_gb > 0 and not what_if:
        warnings.append(f"compute.gpu_memory_gb={gpu_memory_gb} is a GPU what-if, but training runs on the CPU here: "
                        "checked against system RAM")
    verdict = memory_verdict(est, params, budget_bytes=budget, where=where, checkpointing=gradient_checkpointing,
                             max_tokens_per_batch=max_tokens_per_batch, packing=packing)
    if not verdict["fits"] and not (auto_fit and verdict["auto_fit"]):
        if on_cuda:
            raise ComputeError(verdict["message"])
        warnings.append(verdict["message"])  # system RAM: swap may carry it; say so, do not refuse
    run = verdict["auto_fit"] if (auto_fit and not verdict["fits"] and verdict["auto_fit"]) else verdict["run"]
    chosen = estimate_memory(shapes, cfg, {**params, "per_device_train_batch_size":
                                           run["per_device_train_batch_size"]},
                             apply_lora=apply_lora, max_tokens_per_batch=max_tokens_per_batch, **lora_kw)["bytes"]
    ckpt = bool(run["gradient_checkpointing"])
    activations = chosen["activations_checkpointed"] if ckpt else chosen["activations"]
    estimate_gb = {k: _gb(b[k]) for k in ("weights", "gradients", "optimizer")}
    estimate_gb.update(activations=_gb(activations), total=_gb(chosen["state"] + activations),
                       total_without_checkpointing=_gb(chosen["total"]),
                       total_with_checkpointing=_gb(chosen["total_checkpointed"]))
    return {
        "device": resolved,
        "cuda_devices": int(cuda_devices),
        "gpus_used": int(gpus_used),
        "memory_available_gb": _gb(available_memory_bytes),
        "memory_budget_gb": _gb(budget),
        "memory_what_if_gpu_gb": gpu_memory_gb if what_if else None,
        "estimate_gb": estimate_gb,
        "tokens_per_micro_batch": micro_batch_tokens(run["per_device_train_batch_size"], est["max_seq_length"],
                                                     max_tokens_per_batch),
        "mode": "lora" if apply_lora else "full",
        "params_total": est["params_total"],
        "params_trainable": est["params_trainable"],
        "params_source": source,
        # what the finetune step must run (auto_fit may have changed the first two; the third is the auto rule's)
        "per_device_train_batch_size": int(run["per_device_train_batch_size"]),
        "gradient_accumulation_steps": int(run["gradient_accumulation_steps"]),
        "gradient_checkpointing": ckpt,
        "auto_fit_applied": bool(auto_fit and not verdict["fits"] and verdict["auto_fit"]),
        "memory_fit": verdict["summary"],
        "memory_message": verdict["message"],
        "warnings": warnings,
    }
