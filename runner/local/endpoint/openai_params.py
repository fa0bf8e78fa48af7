"""Every OpenAI chat-completions request field, and what this endpoint does with it: implemented (and effective),
accepted because it does not change a reply (as in OpenAI's own API), or refused with a 400 that names it.

Nothing is silently ignored: a client that asks for tools, JSON mode or log-probabilities must learn that it did not
get them, instead of reading a reply that only looks like one. A field OpenAI does not define at all is refused too,
as OpenAI refuses it ("Unrecognized request argument"). Pure Python: the parser processes import it.
"""

from typing import Any, Dict, Optional

# handled by parse_chat_request (server.py) and the generation's logits processors
IMPLEMENTED = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
               "stream", "stream_options", "presence_penalty", "frequency_penalty", "logit_bias")
# no effect on the reply in OpenAI's API either: identifiers for abuse monitoring and caching
NO_EFFECT = ("user", "safety_identifier", "prompt_cache_key")
# field -> the values that ask for nothing this endpoint lacks (null is always accepted: it means "the default")
NEUTRAL_VALUES: Dict[str, tuple] = {
    "logprobs": (False,),
    "store": (False,),  # nothing is stored here; store=true would promise a record that never exists
    "parallel_tool_calls": (True, False),  # says how tools are called: without tools it asks for nothing
    "service_tier": ("auto", "default"),  # the only tier there is
    "modalities": (["text"],),
    "response_format": ({"type": "text"},),
    "tool_choice": ("none",),
}
WHY_REFUSED = {
    "logprobs": "log-probabilities are not returned by this endpoint",
    "top_logprobs": "log-probabilities are not returned by this endpoint",
    "seed": "per-request seeds are not supported: rows of one batch share the sampler (the server has --seed)",
    "response_format": "only {\"type\": \"text\"} is supported (no JSON mode or JSON schema)",
    "tools": "tool calling is not supported",
    "tool_choice": "tool calling is not supported (only \"none\")",
    "parallel_tool_calls": "tool calling is not supported",
    "functions": "function calling is not supported",
    "function_call": "function calling is not supported",
    "store": "completions are not stored (only store=false)",
    "metadata": "completions are not stored, so there is nothing to attach metadata to",
    "service_tier": "there is one service tier (only \"auto\" or \"default\")",
    "modalities": "the endpoint produces text only (only [\"text\"])",
    "audio": "the endpoint produces text only",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "the model has no reasoning-effort setting",
    "verbosity": "the model has no verbosity setting",
    "web_search_options": "web search is not supported",
}
REFUSED = tuple(WHY_REFUSED)
# vLLM-style extension (the openai client's extra_body): the generation supports it, so it is taken, not refused
EXTENSIONS = ("top_k",)
PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's range for presence_penalty and frequency_penalty
LOGIT_BIAS_RANGE = (-100.0, 100.0)
MAX_LOGIT_BIAS_ENTRIES = 300  # OpenAI's limit


class FieldError(ValueError):
    """A request field that is refused or malformed; `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def check_fields(body: Dict[str, Any]) -> None:
    """Refuse, by name, every field this endpoint would otherwise ignore or does not know."""
    for name, value in body.items():
        if name in IMPLEMENTED or name in NO_EFFECT or name in EXTENSIONS:
            continue
        if name in WHY_REFUSED:
            if value is None or value in NEUTRAL_VALUES.get(name, ()):
                continue
            raise FieldError(name, f"{name}={_show(value)} is not supported: {WHY_REFUSED[name]}")
        raise FieldError(name, f"unrecognized request argument {name!r}; this endpoint accepts "
                               f"{', '.join(IMPLEMENTED + NO_EFFECT + EXTENSIONS)}")
    for name in NO_EFFECT:
        if body.get(name) is not None and not isinstance(body[name], str):
            raise FieldError(name, f"{name} must be a string")
    options = body.get("stream_options")
    if isinstance(options, dict):
        unknown = sorted(set(options) - {"include_usage"})
        if unknown:
            raise FieldError(f"stream_options.{unknown[0]}", f"stream_options.{unknown[0]} is not supported; only "
                                                              f"include_usage is")


def _show(value) -> str:
    import json

    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 60 else text[:57] + "..."


def _finite(value, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise FieldError(name, f"{name} must be a number from {low:g} to {high:g}, got {_show(value)}")
    return float(value)


def penalties(body: Dict[str, Any]) -> Dict[str, float]:
    """presence_penalty and frequency_penalty (0 when absent), checked against OpenAI's range."""
    return {name: 0.0 if body.get(name) is None else _finite(body[name], name, *PENALTY_RANGE)
            for name in ("presence_penalty", "frequency_penalty")}


def logit_bias(body: Dict[str, Any], vocab_size: Optional[int] = None) -> Dict[int, float]:
    """{"token id": bias}: token ids as decimal strings (JSON keys), biases -100..100 added to the logits."""
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise FieldError("logit_bias", "logit_bias must be an object mapping token ids to biases from -100 to 100")
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise FieldError("logit_bias", f"logit_bias holds {len(value)} entries; at most {MAX_LOGIT_BIAS_ENTRIES}")
    bias = {}
    for key, amount in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()) or len(key) > 9:
            raise FieldError("logit_bias", f"logit_bias key {_show(key)} is not a token id (a decimal number)")
        token = int(key)
        if vocab_size is not None and token >= vocab_size:
            raise FieldError("logit_bias", f"logit_bias names token {token}; the model's vocabulary has "
                                           f"{vocab_size} tokens")
        bias[token] = _finite(amount, f"logit_bias[{key!r}]", *LOGIT_BIAS_RANGE)
    return bias
