"""Chunked causal-LM cross-entropy: the loss of a causal LM without ever holding the whole fp32 logits
(finetune.local.chunked_loss).

The standard path (transformers' ForCausalLMLoss) computes lm_head over every token, upcasts the logits to fp32 and
runs log-softmax over them: at the start of the backward the fp32 logits, log-softmax's saved output and the
gradients w.r.t. both exist for every token of the micro-batch (12 bytes x vocab per token: 1.5 GB per 4k tokens
for Phi-3's 32,064 ids). Here:

- the model's forward runs as usual except that its head gets zero tokens (a forward pre-hook on the output
  embeddings records the head's input, the final hidden states, and hands the head an empty slice), so the model
  computes no logits and no loss;
- only the positions that have a label (assistant tokens, after the usual shift) are kept;
- lm_head + fp32 upcast + cross-entropy run over chunks of `chunk_tokens` of those positions, each chunk under
  non-reentrant torch.utils.checkpoint: the forward keeps only the chunk's hidden states, the backward recomputes
  that chunk's logits, so at most one chunk's logits (and their gradients) exist at any moment.

The sum is normalised exactly as ForCausalLMLoss does (by num_items_in_batch when the Trainer passes it, else the
mean over labelled tokens), so the loss and every gradient equal the standard path's up to float rounding (the
head's matmul runs on fewer rows at a time). The head's FLOPs drop too: positions without a label (prompts,
padding) get no logits at all. The cost: one lm_head forward per chunk is computed twice, and selecting the
labelled positions reads their count back from the device (one sync per micro-batch).
"""

import contextlib
from typing import Optional

from runner.memory.terms import CHUNK_TOKENS  # labelled tokens per chunk: 12 x 32,064 x 1,024 B ~ 0.39 GB (Phi-3)

IGNORE_INDEX = -100


class _HeadInput:
    hidden = None


@contextlib.contextmanager
def head_input_capture(head):
    """While open, the module `head` records its input in `.hidden` and computes over zero tokens instead."""
    captured = _HeadInput()

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("input")
        captured.hidden = hidden
        return (hidden[..., :0, :],) + tuple(args[1:]), kwargs

    handle = head.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def _chunk_sum(head, hidden, labels):
    import torch.nn.functional as F

    logits = head(hidden).float()
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_causal_lm_loss(hidden, head, labels, *, num_items_in_batch=None, chunk_tokens: int = CHUNK_TOKENS,
                           shift: bool = True):
    """ForCausalLMLoss(head(hidden), labels) without the full logits. hidden: [batch, seq, h], the head's input;
    labels: [batch, seq], unshifted (shift=True: token t predicts label t+1, the last position of each row has no
    target), -100 where no loss is taken."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    if shift:
        labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).to(flat_hidden.device)
    keep = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    count = int(keep.numel())
    if count == 0:
        total = flat_hidden.sum() * 0.0  # keeps the graph; 0 / 0 below is the standard path's nan
    else:
        selected, targets = flat_hidden.index_select(0, keep), flat_labels.index_select(0, keep)
        grad = torch.is_grad_enabled()
        parts = []
        for start in range(0, count, max(1, int(chunk_tokens))):
            h, y = selected[start:start + chunk_tokens], targets[start:start + chunk_tokens]
            parts.append(checkpoint(_chunk_sum, head, h, y, use_reentrant=False) if grad else _chunk_sum(head, h, y))
        total = torch.stack(parts).sum()
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    return total / count if count else total / 0.0


def output_head(model):
    """The module whose input the loss needs: the model's output embeddings (lm_head), through PEFT and wrappers."""
    head: Optional[object] = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings: finetune.local.chunked_loss needs them")
    return head
