"""The memory a fine-tune needs, from the parameter inventory (safetensors headers, or config.json arithmetic) and
the per-token terms (runner/memory/terms.py): weights, gradients, optimizer state and activations, and whether a
micro-batch fits a budget. No torch, no weights loaded: the local compute step, the local dry run and the Azure
compute checks all ask it."""

import json
import math
import struct
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from runner.errors import ComputeError
from runner.memory.terms import (GB, UNGATED_TYPES, activation_terms, checkpointed_terms, config_value, describe_option,
                                 fit_micro_batch, micro_batch_tokens, model_dims)

# Weight names of the embeddings and the output head: never LoRA targets, the usual modules_to_save.
_NOT_LINEAR = ("embed", "wte", "wpe", "lm_head", "embed_out", "word_embeddings", "position_embeddings")


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


def config_shapes(cfg: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """Tensor name -> shape of a decoder-only transformer described by config.json (Llama-style names; Phi-3's
    fused qkv_proj/gate_up_proj). Biases are left out: they are a rounding error in the estimate."""
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    h = config_value(cfg, "hidden_size", "n_embd", "d_model")
    layers = config_value(cfg, "num_hidden_layers", "n_layer", "num_layers")
    vocab = config_value(cfg, "vocab_size")
    if not (h and layers and vocab):
        raise ComputeError("config.json lacks hidden_size / num_hidden_layers / vocab_size, so the model's size "
                           "cannot be estimated; save the model with save_pretrained (config.json + *.safetensors)")
    heads = config_value(cfg, "num_attention_heads", "n_head", default=1)
    kv_heads = config_value(cfg, "num_key_value_heads", default=heads)
    head_dim = config_value(cfg, "head_dim", default=h // heads)
    inter = config_value(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * h)
    experts = config_value(cfg, "num_local_experts", "num_experts", default=1)
    model_type = cfg.get("model_type", "")
    gated = model_type not in UNGATED_TYPES
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
    return config_shapes(cfg), cfg, "config.json"


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
    linears = {n[: -len(".weight")]: s for n, s in shapes.items()
               if n.endswith(".weight") and len(s) == 2 and not any(k in n for k in _NOT_LINEAR)}
    notes: List[str] = []
    chosen = linears
    if apply_lora:
        targets = list(lora_target_modules or [])
        chosen = {m: s for m, s in linears.items() if _matches(m, targets)} if targets else dict(linears)
        if targets and not chosen:
            notes.append(f"no linear layer matches lora_target_modules={targets}; estimated as if all were targeted")
            chosen = dict(linears)
    state = _state_bytes(shapes, chosen, params, apply_lora=apply_lora, lora_modules_to_save=lora_modules_to_save,
                         shards=shards)
    # Activations: per-token terms from the architecture (runner/memory/terms.py documents each), at the worst-case
    # micro-batch (batch size x max_seq_length, capped by max_tokens_per_batch), with and without checkpointing.
    dims = model_dims(cfg)
    seq = int(params.get("max_seq_length", -1) or -1)
    if seq <= 0:
        seq = dims["max_positions"]
    if tokens is None:
        tokens = micro_batch_tokens(int(params.get("per_device_train_batch_size", 1) or 1), seq, max_tokens_per_batch)
    trained = [(m, int(s[1])) for m, s in chosen.items()]
    terms = activation_terms(dims, trained, lora=apply_lora, half=half, lora_r=int(params.get("lora_r", 8) or 8),
                             lora_dropout=float(params.get("lora_dropout", 0.0) or 0.0) if apply_lora else 0.0,
                             chunked_loss=chunked_loss, tokens=int(tokens))  # finetune.local.chunked_loss
    ckpt_terms = checkpointed_terms(terms, dims, weights_16bit=state["weights_16bit"], lora=apply_lora)
    per_token, per_token_ckpt = sum(terms.values()), sum(ckpt_terms.values())
    activations, activations_ckpt = tokens * per_token, tokens * per_token_ckpt
    weights, gradients, optimizer = state["weights"], state["gradients"], state["optimizer"]
    held = weights + gradients + optimizer
    return {
        "params_total": int(state["total"]),
        "params_trainable": int(state["trainable"]),
        "bytes": {"weights": weights, "gradients": gradients, "optimizer": optimizer,
                  "activations": activations, "state": held, "total": held + activations,
                  "activations_checkpointed": activations_ckpt, "total_checkpointed": held + activations_ckpt},
        "tokens_per_micro_batch": int(tokens),
        "max_seq_length": int(seq),
        "bytes_per_token": {"without_checkpointing": per_token, "with_checkpointing": per_token_ckpt,
                            "terms": terms, "terms_checkpointed": ckpt_terms},
        "notes": notes,
    }


def _state_bytes(shapes: Dict[str, Tuple[int, ...]], chosen: Dict[str, Tuple[int, ...]], params: Dict[str, Any], *,
                 apply_lora: bool, lora_modules_to_save: Optional[List[str]], shards: int) -> Dict[str, Any]:
    """Weights, gradients and optimizer state per device (`chosen`: the LoRA-targeted linears), after ZeRO sharding."""
    half = int(params.get("precision", 32)) == 16
    deepspeed = bool(params.get("apply_deepspeed"))
    total = sum(_numel(s) for s in shapes.values())
    r = int(params.get("lora_r", 8))
    saved = 0
    if apply_lora:
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
    if deepspeed and shards > 1:
        optimizer, gradients = optimizer / shards, gradients / shards
        if int(params.get("deepspeed_stage", 2)) >= 3:
            weights = weights / shards
    return {"total": total, "trainable": trainable, "weights": weights, "gradients": gradients,
            "optimizer": optimizer, "weights_16bit": wbytes == 2}


def gb(n: float) -> float:
    return round(n / GB, 3)


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
    without_gb, with_gb = gb(b["state"] + tokens * per["without_checkpointing"]), gb(
        b["state"] + tokens * per["with_checkpointing"])
    summary = {
        "tokens_per_micro_batch": tokens,
        "budget_gb": gb(budget_bytes),
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
                   f"of {gb(budget_bytes):.1f} GB ({where})"
                   + (f"; gradient checkpointing on (auto: ~{without_gb:.1f} GB without it{cap})"
                      if ckpt and str(checkpointing).lower() == "auto" else ""))
        return {"fits": True, "run": fit["configured"], "auto_fit": None, "message": message, "head": message,
                "longest_max_seq_length": None, "summary": summary}
    head = (
        f"the micro-batch does not fit: per_device_train_batch_size={bs} x max_seq_length={seq} = {tokens} tokens "
        f"needs ~{without_gb:.1f} GB without gradient checkpointing (~{with_gb:.1f} GB with it; weights + "
        f"optimizer state {gb(b['state']):.1f} GB) but {gb(budget_bytes):.1f} GB may be used ({where}). "
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
            "total_gb": gb(opt["total_bytes"])}
