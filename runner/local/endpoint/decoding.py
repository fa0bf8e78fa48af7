"""The decoding loop of one batch, shrinking as rows end.

`model.generate` keeps every row of a batch in every forward pass until the longest one ends: a row whose client
went away (or that met its stop string or max_new_tokens) went on costing a row of compute at every step. This loop
does what generate does for our per-row settings (left-padded prefill, KV cache, logits processors, argmax or one
multinomial draw per row) and, after each step, drops the rows that ended from the batch: the cache, the token
history and the attention mask lose those rows, so the next forward pass is smaller.

The sampling settings of the model's own generation_config (temperature, repetition_penalty, ...) are not applied:
every setting comes from the request, as with generate called with them neutralised before.
"""

from typing import Callable, List, Sequence

# processors_for(active row indices) -> callables (token history, scores) -> scores, applied in order
ProcessorsFor = Callable[[Sequence[int]], List[Callable]]
# on_step(active row indices, each one's new token) -> for each, whether that row has ended
OnStep = Callable[[Sequence[int], List[int]], List[bool]]


def _select(cache, keep) -> None:
    for layer in cache.layers:
        layer.batch_select_indices(keep)


def _cache_argument(model) -> str:
    """transformers 5.24 renames forward's `past_key_values` to `cache` (the old name warns until 5.40)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decode(model, input_ids, attention_mask, *, max_new_tokens: int, sample: bool, processors_for: ProcessorsFor,
           on_step: OnStep, on_forward: Callable[[int], None] = None) -> None:
    """Run until every row has ended (on_step) or max_new_tokens steps. `sample`: draw from the processed
    distribution (greedy rows have been reduced to their argmax by then), else take the argmax. `on_forward` is
    told each forward pass's batch size."""
    import torch
    from transformers import DynamicCache

    device = model.device
    tokens = input_ids.to(device)
    attention = attention_mask.to(device)
    active = list(range(tokens.shape[0]))
    processors = processors_for(active)
    cache = DynamicCache(config=model.config)
    cache_arg = _cache_argument(model)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    step_input = tokens
    with torch.inference_mode():
        for step in range(max_new_tokens):
            if on_forward is not None:
                on_forward(len(active))
            out = model(input_ids=step_input, attention_mask=attention, position_ids=positions,
                        use_cache=True, logits_to_keep=1, **{cache_arg: cache})
            scores = out.logits[:, -1, :].float()
            for processor in processors:
                scores = processor(tokens, scores)
            if sample:
                chosen = torch.multinomial(scores.softmax(dim=-1), num_samples=1).squeeze(1)
            else:
                chosen = scores.argmax(dim=-1)
            tokens = torch.cat([tokens, chosen[:, None]], dim=-1)
            ended = on_step(active, chosen.tolist())
            if all(ended) or step == max_new_tokens - 1:
                return
            attention = torch.cat([attention, attention.new_ones((attention.shape[0], 1))], dim=-1)
            if any(ended):  # the ended rows leave the batch: the next forward pass is only the live ones
                keep = torch.tensor([i for i, gone in enumerate(ended) if not gone], device=device)
                _select(cache, keep)
                tokens, attention, chosen = tokens[keep], attention[keep], chosen[keep]
                active = [row for row, gone in zip(active, ended) if not gone]
                processors = processors_for(active)
            positions = attention.sum(dim=-1, keepdim=True) - 1
            step_input = chosen[:, None]
