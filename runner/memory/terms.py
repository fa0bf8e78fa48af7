"""Peak GPU memory of a training step, from the architecture alone (no torch, no weights): the activations the
autograd graph keeps per token, with and without gradient checkpointing, and what follows from them (does the
micro-batch fit, should checkpointing be on, the largest micro-batch that fits).

Everything here is plain arithmetic on config.json numbers, so the local compute step, the local dry run and the
Azure compute step can all call it before (or without) loading anything.

Where the per-token figures come from (transformers 5 + PEFT 0.21 + torch autocast, read off the modules' forward
code and checked by counting the bytes autograd saves on a small Phi-3 on the CPU, tests/memory/test_estimate.py).
Bytes per token, `a` = bytes of the compute dtype (2 under bf16/fp16 autocast, 4 in fp32):

per decoder layer
  RMSNorm x2             4h each: the fp32 upcast of its input (`hidden_states.to(float32)`), saved for the
                         backward of pow/mul; a trainable norm weight (full fine-tuning) also keeps the normalized
                         fp32 copy (+4h). Under LoRA the first layer's input norm saves nothing: the embeddings are
                         frozen, so no gradient flows there.
  trained linear input   LoRA in 16-bit: PEFT casts the input to the adapter's fp32 (`_cast_input_dtype`), autocast
                         casts it back to bf16 for lora_A, and that private bf16 copy is saved: a*d_in per targeted
                         module (q, k and v each keep their own). Frozen base linears save nothing. In fp32 the
                         modules reading the same tensor share it (one 4*d_in per input). lora_dropout > 0 adds the
                         dropout mask (1 byte per element on CUDA; counted 4 in fp32, the CPU path). Full
                         fine-tuning: every linear keeps its (cast) input, a*d_in. lora_A's output (a*r) is saved for
                         lora_B.
  attention              SDPA (flash / memory-efficient, the packed path runs it per conversation) saves q, k, v,
                         its output (a*q_out) and the fp32 log-sum-exp (4*heads). q and k are the rotary outputs
                         (a*q_out + a*kv_out); v is a view of the projection's output, so the fused qkv_proj's whole
                         output stays alive (a*(q_out + 2*kv_out)); unfused, only v_proj's (a*kv_out). With grouped KV
                         heads repeat_kv makes full-width copies of k and v (2*a*q_out) and the projections are freed.
  MLP                    gated (SwiGLU): gate and up outputs (a*2i, kept by SiLU and the product) + the SiLU output
                         (a*i); the product is down_proj's input (counted above). Ungated: the fc1 output (a*i).
head
  final norm             4h (+4h when trainable)
  logits and the loss    12*V: the loss upcasts the logits to fp32 and log_softmax saves its fp32 output (4V); at the
                         start of the backward the gradient w.r.t. that output (4V) and w.r.t. the logits (4V) exist
                         next to it. This is the peak moment: every layer's activations are still alive.
  rotary cos/sin         2*a*head_dim, shared by the layers
  with finetune.local.chunked_loss (runner/local/loss.py; `tokens` = the micro-batch's tokens given): the full
                         logits never exist. Per token: the labelled positions' hidden states that the chunks'
                         checkpoints keep (w*h, w = 2 for a 16-bit LoRA base, else 4) and their index and target
                         (16); lm_head_input is 0 (the head's cast input is rebuilt per chunk). One chunk's
                         logits-and-loss, 12*V*C bytes (C = runner.local.loss.CHUNK_TOKENS labelled tokens), exist at
                         the peak, spread here over the micro-batch: logits_and_loss = 12*V*min(tokens, C)/tokens.
                         Tokens unknown: 12*V, the standard figure (never an underestimate).

gradient checkpointing (transformers' per-decoder-layer checkpointing): each layer keeps only its input hidden
state (w*h, w = bytes of the residual stream: 2 when the weights are 16-bit, else 4); one layer's activations are
rebuilt at a time during the backward; the head terms stay.

state (weights, gradients, optimizer) is counted by runner.memory.estimate.estimate_memory; gradients are counted in
full beside the activations, which is exact with gradient accumulation and a small overcount otherwise.

Not counted (each well under 1% at the calibrated size): the CUDA context (outside torch's allocator), cuBLAS
workspaces, flash-attention's per-conversation backward scratch, gradient tensors in flight for one layer.
"""

from typing import Any, Dict, Optional, Sequence, Tuple

GB = 1e9
GiB = 1024 ** 3
CHUNK_TOKENS = 1024  # finetune.local.chunked_loss: labelled tokens per chunk (runner/local/loss.py computes with it)

# module short names that read the attention block's input / the MLP's input (modules sharing one input tensor)
_ATTN_IN = ("qkv_proj", "q_proj", "k_proj", "v_proj", "query_key_value", "c_attn", "Wqkv", "in_proj")
_MLP_IN = ("gate_up_proj", "gate_proj", "up_proj", "fc1", "w1", "w3", "c_fc", "dense_h_to_4h", "fc_in")
# Architectures whose MLP is a plain up/down pair (no gate); every other model type is assumed gated
UNGATED_TYPES = {"gpt2", "gpt_neox", "gptj", "opt", "phi", "falcon", "bloom", "gpt_bigcode", "mpt", "codegen"}


def config_value(cfg: Dict[str, Any], *keys, default=None):
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def model_dims(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The numbers of config.json the estimate reads (a multimodal config's text_config if that holds them)."""
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], "model_type": cfg["text_config"].get("model_type", cfg.get("model_type"))}
    h = int(config_value(cfg, "hidden_size", "n_embd", "d_model", default=0) or 0)
    heads = int(config_value(cfg, "num_attention_heads", "n_head", default=1) or 1)
    kv_heads = int(config_value(cfg, "num_key_value_heads", default=heads) or heads)
    head_dim = int(config_value(cfg, "head_dim", default=(h // heads) if heads else 0) or 0)
    model_type = str(cfg.get("model_type", ""))
    return {
        "hidden": h,
        "intermediate": int(config_value(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * h) or 4 * h),
        "layers": int(config_value(cfg, "num_hidden_layers", "n_layer", "num_layers", default=0) or 0),
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab": int(cfg.get("vocab_size", 0) or 0),
        "gated": model_type not in UNGATED_TYPES,
        "fused_qkv": model_type == "phi3",
        "max_positions": int(config_value(cfg, "max_position_embeddings", "n_positions", default=2048) or 2048),
    }


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _input_group(name: str) -> str:
    """Modules of one layer that read the same tensor share a group (q/k/v; gate/up)."""
    short = _short(name)
    layer = name[: -len(short)]
    if short in _ATTN_IN:
        return layer + "<attn-in>"
    if short in _MLP_IN:
        return layer + "<mlp-in>"
    return name


def activation_terms(
    dims: Dict[str, Any],
    trained_linears: Sequence[Tuple[str, int]],
    *,
    lora: bool,
    half: bool,
    lora_r: int = 8,
    lora_dropout: float = 0.0,
    chunked_loss: bool = False,
    tokens: int = 0,
) -> Dict[str, float]:
    """Bytes per token of the activations autograd keeps at the peak (the start of the backward), by term, without
    gradient checkpointing. `trained_linears`: (module name, in_features) of every linear layer whose input the
    backward needs: the LoRA targets, or every linear layer for full fine-tuning."""
    a = 2 if half else 4
    h, i, layers = dims["hidden"], dims["intermediate"], dims["layers"]
    heads, kv, hd, vocab = dims["heads"], dims["kv_heads"], dims["head_dim"], dims["vocab"]
    q_out, kv_out = heads * hd, kv * hd
    full = not lora

    norm = (4 * h + (4 * h if full else 0))
    norms = 2 * layers * norm - (4 * h if lora and layers else 0)  # LoRA: layer 0's input norm has no grad path

    linear_inputs = 0.0
    masks = 0.0
    lora_mid = 0.0
    if half or (lora and lora_dropout > 0):
        # a private (cast or dropped-out) copy per module
        linear_inputs = sum(a * d for _, d in trained_linears)
    else:
        groups: Dict[str, int] = {}
        for name, d in trained_linears:
            groups[_input_group(name)] = d
        linear_inputs = 4 * sum(groups.values())
    if lora:
        lora_mid = sum(a * lora_r for _ in trained_linears)
        if lora_dropout > 0:
            masks = sum((1 if half else 4) * d for _, d in trained_linears)

    if kv < heads:  # grouped KV heads: repeat_kv copies k and v to full width; projections not kept
        attention = a * q_out + 2 * a * q_out + a * q_out + 4 * heads
    elif dims["fused_qkv"]:
        attention = a * (q_out + 2 * kv_out) + a * q_out + a * kv_out + a * q_out + 4 * heads
    else:
        attention = a * kv_out + a * q_out + a * kv_out + a * q_out + 4 * heads
    mlp = (a * 2 * i + a * i) if dims["gated"] else a * i

    # the head: the fp32 logits and the loss over every token, or (chunked_loss) over one chunk at a time
    lm_head_input, logits_and_loss, chunked_inputs = (a * h if full else 0), 12 * vocab, 0
    if chunked_loss and tokens > 0:
        lm_head_input = 0
        chunked_inputs = (2 if half and lora else 4) * h + 16
        logits_and_loss = 12 * vocab * min(int(tokens), CHUNK_TOKENS) / int(tokens)

    terms = {
        "norms": float(norms),
        "trained_linear_inputs": float(linear_inputs),
        "lora_dropout_masks": float(masks),
        "lora_a_outputs": float(lora_mid),
        "attention": float(layers * attention),
        "mlp": float(layers * mlp),
        "final_norm": float(norm),
        "lm_head_input": float(lm_head_input),
        "logits_and_loss": float(logits_and_loss),
        "rotary": float(2 * a * hd),
    }
    if chunked_inputs:
        terms["chunked_loss_inputs"] = float(chunked_inputs)
    return terms


def checkpointed_terms(terms: Dict[str, float], dims: Dict[str, Any], *, weights_16bit: bool,
                       lora: bool) -> Dict[str, float]:
    """The same peak with gradient checkpointing on every decoder layer: the layers' inputs, one layer rebuilt,
    the head. (LoRA needs enable_input_require_grads here, so the rebuilt layer's input norm saves too.)"""
    layers = max(dims["layers"], 1)
    h = dims["hidden"]
    per_layer_keys = ("norms", "trained_linear_inputs", "lora_dropout_masks", "lora_a_outputs", "attention", "mlp")
    per_layer = sum(terms[k] for k in per_layer_keys) / layers + (4 * h / layers if lora else 0)
    out = {
        "layer_inputs": float(dims["layers"] * (2 if weights_16bit else 4) * h),
        "one_layer_rebuilt": float(per_layer),
        "final_norm": terms["final_norm"],
        "lm_head_input": terms["lm_head_input"],
        "logits_and_loss": terms["logits_and_loss"],
        "rotary": terms["rotary"],
    }
    if "chunked_loss_inputs" in terms:  # the head's terms stay under checkpointing, chunked or not
        out["chunked_loss_inputs"] = terms["chunked_loss_inputs"]
    return out


# ---- decisions ---------------------------------------------------------------------------------------------------
def checkpointing_setting(value: Any) -> str:
    """finetune.local.gradient_checkpointing as one of 'auto', 'true', 'false' (Hydra gives bools for true/false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value if value is not None else "auto").strip().lower()
    if text in ("auto", "true", "false"):
        return text
    raise ValueError(f"finetune.local.gradient_checkpointing={value!r} must be auto, true or false")


def use_gradient_checkpointing(setting: Any, total_without_bytes: float, budget_bytes: Optional[float]) -> bool:
    """The `auto` rule, as the trainer applies it: true/false as set; auto turns checkpointing on only when the
    estimated peak without it exceeds the memory budget (unknown budget: off)."""
    mode = checkpointing_setting(setting)
    if mode != "auto":
        return mode == "true"
    return budget_bytes is not None and total_without_bytes > budget_bytes


def micro_batch_tokens(batch_size: int, seq_len: int, max_tokens_per_batch: int = 0) -> int:
    """Worst-case tokens in one micro-batch: batch_size conversations of max_seq_length each (packed in one row, or
    padded rows), capped by finetune.local.max_tokens_per_batch when packing sets one."""
    tokens = int(batch_size) * int(seq_len)
    if max_tokens_per_batch and max_tokens_per_batch > 0:
        tokens = min(tokens, int(max_tokens_per_batch))
    return tokens


def largest_fitting_batch(state_bytes: float, per_token_bytes: float, budget_bytes: float, seq_len: int,
                          max_tokens_per_batch: int = 0, limit: int = 4096) -> int:
    """The largest per-device micro-batch (conversations) whose worst-case peak fits the budget; 0 if none."""
    room = budget_bytes - state_bytes
    if room <= 0 or per_token_bytes <= 0:
        return 0
    if micro_batch_tokens(1, seq_len, max_tokens_per_batch) * per_token_bytes > room:
        return 0
    if max_tokens_per_batch and max_tokens_per_batch > 0 and max_tokens_per_batch * per_token_bytes <= room:
        return limit  # the token cap holds every micro-batch under the budget
    return max(1, min(limit, int(room // (per_token_bytes * seq_len))))


def _divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


def fit_micro_batch(
    *,
    state_bytes: float,
    per_token_bytes: float,
    per_token_bytes_checkpointed: float,
    budget_bytes: float,
    seq_len: int,
    batch_size: int,
    grad_accum: int,
    checkpointing: Any = "auto",
    max_tokens_per_batch: int = 0,
) -> Dict[str, Any]:
    """Does the configured micro-batch fit, and if not, the largest that does, with and without gradient
    checkpointing, each with the gradient accumulation that keeps the effective batch (batch x accumulation)
    exactly: the micro-batch is the largest divisor of the effective batch that fits.

    `choice` is what to run: the configured batch (checkpointing per the auto rule) when that fits, else the
    suggestion the checkpointing setting allows (auto/true: with checkpointing, which fits the most; false: without).
    fits=False means even one conversation of max_seq_length does not fit that way."""
    mode = checkpointing_setting(checkpointing)
    batch_size, grad_accum = max(1, int(batch_size)), max(1, int(grad_accum))
    effective = batch_size * grad_accum

    def total(bs: int, ckpt: bool) -> float:
        per = per_token_bytes_checkpointed if ckpt else per_token_bytes
        return state_bytes + micro_batch_tokens(bs, seq_len, max_tokens_per_batch) * per

    def option(ckpt: bool) -> Optional[Dict[str, Any]]:
        per = per_token_bytes_checkpointed if ckpt else per_token_bytes
        largest = largest_fitting_batch(state_bytes, per, budget_bytes, seq_len, max_tokens_per_batch)
        if largest < 1:
            return None
        bs = _divisor_at_most(effective, largest)
        return {"per_device_train_batch_size": bs, "gradient_accumulation_steps": effective // bs,
                "gradient_checkpointing": ckpt, "largest_micro_batch": largest,
                "total_bytes": total(bs, ckpt)}

    without, with_ckpt = option(False), option(True)
    fits_without = total(batch_size, False) <= budget_bytes
    fits_with = total(batch_size, True) <= budget_bytes
    configured_ckpt = use_gradient_checkpointing(mode, total(batch_size, False), budget_bytes)
    configured_fits = fits_with if configured_ckpt else fits_without
    if configured_fits:
        choice = {"per_device_train_batch_size": batch_size, "gradient_accumulation_steps": grad_accum,
                  "gradient_checkpointing": configured_ckpt, "total_bytes": total(batch_size, configured_ckpt)}
    else:
        choice = without if mode == "false" else (with_ckpt or without)
    return {
        "configured": {"per_device_train_batch_size": batch_size, "gradient_accumulation_steps": grad_accum,
                       "gradient_checkpointing": configured_ckpt,
                       "total_bytes": total(batch_size, configured_ckpt)},
        "configured_fits": bool(configured_fits),
        "fits_without_checkpointing": bool(fits_without),
        "fits_with_checkpointing": bool(fits_with),
        "without_checkpointing": without,
        "with_checkpointing": with_ckpt,
        "choice": choice,
        "budget_bytes": float(budget_bytes),
    }


def describe_option(opt: Optional[Dict[str, Any]]) -> str:
    if not opt:
        return "nothing fits (not even 1 conversation)"
    return (f"per_device_train_batch_size={opt['per_device_train_batch_size']} with "
            f"gradient_accumulation_steps={opt['gradient_accumulation_steps']} "
            f"(~{opt['total_bytes'] / GB:.1f} GB)")


def gpu_memory_bytes(gpu_memory_gb: float) -> float:
    """compute.gpu_memory_gb is a GPU's nominal size (A100 80GB -> 80), which vendors count in GiB: an "80GB" A100
    holds 81,920 MiB. As bytes."""
    return float(gpu_memory_gb) * GiB


def ratio_bounds_ok(estimate: float, measured: float, low: float = 0.95, high: float = 1.25) -> bool:
    """The trust bound: never more than 5% below the measured peak, at most 25% above it."""
    return low <= estimate / measured <= high


# config.json numbers of the registry models the presets name (conf/model/), for planning a run whose weights are
# not on this machine (the Azure compute step): the published Hugging Face configs.
KNOWN_CONFIGS: Dict[str, Dict[str, Any]] = {
    "Phi-3-mini-4k-instruct": {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
                               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                               "vocab_size": 32064, "max_position_embeddings": 4096, "tie_word_embeddings": False},
    "Phi-3.5-mini-instruct": {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192,
                              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                              "vocab_size": 32064, "max_position_embeddings": 131072, "tie_word_embeddings": False},
    "Phi-4": {"model_type": "phi3", "hidden_size": 5120, "intermediate_size": 17920, "num_hidden_layers": 40,
              "num_attention_heads": 40, "num_key_value_heads": 10, "vocab_size": 100352,
              "max_position_embeddings": 16384, "tie_word_embeddings": False},
}


def known_model_config(model_name: str) -> Optional[Dict[str, Any]]:
    for name, config in KNOWN_CONFIGS.items():
        if name.lower() == str(model_name).lower():
            return dict(config)
    return None
