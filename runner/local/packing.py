"""Padding-free batches: a micro-batch is its conversations laid end to end in one row, with no pad token.

Conversations must not see each other. Three things keep them apart:
- position_ids restart at 0 for every conversation (rotary embeddings see each one from its own start);
- the first token of every conversation gets label -100, so no token is predicted from the previous conversation;
- attention is causal *within* each conversation. Stock `sdpa` does this from the restarting position_ids
  (transformers builds a block-diagonal mask when attention_mask is None and no cache is used), but building that
  T x T mask and attending over all of it costs O(T^2) for the whole row. The `packed_sdpa` attention registered
  here runs causal SDPA per conversation, bounded by `cu_seq_lens_q` (the keyword flash-attention's varlen path
  reads too), and the matching mask function skips the T x T mask while a packed batch is running. Without those
  bounds (and, for the mask, outside a packed batch) both fall back to stock sdpa, so generation and padded batches
  behave as usual.
- `finetune.local.packed_attention=varlen` registers `packed_varlen` instead: the same bounds, but one call of
  PyTorch's own flash-attention varlen kernel (torch.nn.attention.varlen, CUDA only, torch >= 2.10) per layer over
  the whole packed row, instead of one SDPA call per conversation. Nothing to install: it ships with torch.

Batching: TokenBudgetBatchSampler groups per_device_train_batch_size conversations per micro-batch (capped by a
token budget when one is set), reshuffled every epoch from (seed, epoch) alone, so a resumed run sees the same
batches as an uninterrupted one.
"""

import contextlib
import contextvars
import random
from typing import Dict, Iterator, List, Optional, Sequence

import torch

IGNORE_INDEX = -100
PACKED_ATTENTION = "packed_sdpa"
PACKED_VARLEN = "packed_varlen"
# finetune.local.packed_attention -> the attention implementation registered for it
PACKED_ATTENTIONS = {"per_conversation": PACKED_ATTENTION, "varlen": PACKED_VARLEN}

_in_packed_batch = contextvars.ContextVar("in_packed_batch", default=False)


@contextlib.contextmanager
def packed_batch():
    """While active, the packed_sdpa mask function builds no T x T mask (attention uses cu_seq_lens instead)."""
    token = _in_packed_batch.set(True)
    try:
        yield
    finally:
        _in_packed_batch.reset(token)


def _packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    # Packed when the call carries the bounds: gradient checkpointing recomputes this forward during backward,
    # outside packed_batch() (and on CUDA in autograd's own thread), with the same keyword arguments.
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = cu_seq_lens.tolist()
    parts = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
            is_causal=True, dropout_p=dropout, scale=scaling,
        )
        for start, end in zip(bounds[:-1], bounds[1:])
        if end > start
    ]
    out = torch.cat(parts, dim=2)  # (1, heads, T, head_dim)
    return out.transpose(1, 2).contiguous(), None


def avoid_per_shape_attention_plans() -> None:
    """Keep SDPA off cuDNN's attention kernel on CUDA. cuDNN builds an execution plan for every new sequence
    length, and chat batches (packed conversations, padded rows, each decoding step) bring a new length almost
    every call: measured on an H100 with torch 2.11, 1,216 per-conversation SDPA calls took 28.7 s (24 ms each)
    and a backward 0.44 s on the 2-layer tiny model. The flash and memory-efficient kernels need no plan."""
    import torch

    if torch.cuda.is_available() and hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)


def _packed_sdpa_mask(*args, **kwargs):
    from transformers.masking_utils import sdpa_mask

    if _in_packed_batch.get():
        return None
    return sdpa_mask(*args, **kwargs)


def varlen_refusal(device: str) -> Optional[str]:
    """Why packed_attention=varlen cannot run on `device` here (None: it can). Asked before the model is loaded."""
    import torch

    if device != "cuda" or not torch.cuda.is_available():
        return ("finetune.local.packed_attention=varlen runs PyTorch's flash-attention varlen kernel, which needs a "
                "CUDA GPU; use packed_attention=per_conversation on this machine")
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return (f"finetune.local.packed_attention=varlen needs torch >= 2.10 (torch.nn.attention.varlen); this is "
                f"torch {torch.__version__}: use packed_attention=per_conversation")
    return None


def _causal_keywords(varlen_attn) -> Dict[str, object]:
    """Causal masking in varlen_attn's own words: torch 2.10 takes is_causal, later versions a (left, right)
    window, where (-1, 0) is causal."""
    import inspect

    params = inspect.signature(varlen_attn).parameters
    return {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}


# the kernel and its causal keywords, looked up once when the attention is registered (not a signature inspection
# per layer per step)
_VARLEN: Dict[str, object] = {}


def _packed_varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is None or query.shape[0] != 1:  # not a packed batch (generation, eval of padded rows)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if dropout and module.training:
        raise RuntimeError(f"packed_attention=varlen has no attention dropout (the model asks for {dropout}); use "
                           f"packed_attention=per_conversation")
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # flash attention takes 16-bit inputs only; under autocast SDPA would get them cast, a custom op does not
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    # (1, heads, T, head_dim) -> (T, heads, head_dim), the layout of varlen kernels; made contiguous because the
    # rotary embedding's output is laid out per head (a copy of q, k and v per layer: small next to the matmuls)
    q, k, v = (t[0].transpose(0, 1).to(dtype).contiguous() for t in (query, key, value))
    bounds = cu_seq_lens.to(device=q.device, dtype=torch.int32)
    # the collator's host-side int: reading it off the bounds would sync with the device and, under torch.compile,
    # break the graph (a checkpointed layer compiles only whole: tests/local/test_speed_levers.py)
    longest = kwargs.get("max_length_q")
    longest = int(longest) if longest is not None else int((bounds[1:] - bounds[:-1]).max())
    out = _VARLEN["kernel"](q, k, v, bounds, bounds, longest, longest, scale=scaling, **_VARLEN["causal"])
    return out.unsqueeze(0), None  # (1, T, heads, head_dim), as sdpa_attention_forward returns


def register_packed_attention(kind: str = "per_conversation") -> str:
    """Register the attention for finetune.local.packed_attention=`kind` (with the packed mask function) and return
    its name, for from_pretrained(attn_implementation=...)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    try:
        name = PACKED_ATTENTIONS[kind]
    except KeyError:
        raise ValueError(f"finetune.local.packed_attention={kind!r}: use one of {sorted(PACKED_ATTENTIONS)}") from None
    attention = _packed_sdpa_attention
    if name == PACKED_VARLEN:
        from torch.nn.attention.varlen import varlen_attn

        _VARLEN.update(kernel=varlen_attn, causal=_causal_keywords(varlen_attn))
        attention = _packed_varlen_attention
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, _packed_sdpa_mask)
    return name


# ---- collators -----------------------------------------------------------------------------------------------

def pack_conversations(features: Sequence[Dict[str, List[int]]]) -> Dict[str, torch.Tensor]:
    """One row: concatenated input_ids/labels, position_ids reset per conversation, cu_seq_lens bounds."""
    input_ids: List[int] = []
    labels: List[int] = []
    positions: List[int] = []
    bounds = [0]
    for f in features:
        ids = list(f["input_ids"])
        lab = list(f["labels"])
        lab[0] = IGNORE_INDEX  # never predicted from the previous conversation's last token
        input_ids += ids
        labels += lab
        positions += range(len(ids))
        bounds.append(len(input_ids))
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": longest,
        "max_length_k": longest,
    }


class PaddedCollator:
    """The classic layout (packing off): right-padded rows with an attention mask."""

    def __init__(self, pad_token_id: int, pad_to: Optional[int] = None):
        self.pad_token_id = pad_token_id
        self.pad_to = pad_to

    def __call__(self, features):
        width = self.pad_to or max(len(f["input_ids"]) for f in features)
        ids, labels, mask = [], [], []
        for f in features:
            n = len(f["input_ids"])
            ids.append(list(f["input_ids"]) + [self.pad_token_id] * (width - n))
            labels.append(list(f["labels"]) + [IGNORE_INDEX] * (width - n))
            mask.append([1] * n + [0] * (width - n))
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def batch_token_counts(batch: Dict[str, torch.Tensor]) -> tuple[int, int]:
    """(real tokens, tokens computed on) of a collated batch: the difference is padding."""
    total = int(batch["input_ids"].numel())
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum()), total
    return total, total


# ---- batching ------------------------------------------------------------------------------------------------

class TokenBudgetBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of at most `batch_size` conversations and (if > 0) `max_tokens` tokens.

    Order comes from (seed, epoch) only: the same on every run and after a resume.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, max_tokens: int = 0, seed: int = 0,
                 shuffle: bool = True):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self, epoch: Optional[int] = None) -> List[List[int]]:
        order = list(range(len(self.lengths)))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch if epoch is None else epoch}").shuffle(order)
        out: List[List[int]] = []
        current: List[int] = []
        tokens = 0
        for i in order:
            n = self.lengths[i]
            if current and (len(current) >= self.batch_size or (self.max_tokens > 0 and tokens + n > self.max_tokens)):
                out.append(current)
                current, tokens = [], 0
            current.append(i)
            tokens += n
        if current:
            out.append(current)
        return out

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())
