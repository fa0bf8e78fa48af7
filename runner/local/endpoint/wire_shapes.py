"""The exact shapes the endpoint accepts on the wire, beyond the values' ranges (server.py checks those):

- /score: the body's keys are `input_data` and `params`, input_data's are `input_string` and `parameters`; any
  other key is refused by name (a misspelt `paramters` would otherwise be ignored silently and the request served
  with defaults). `parameters` is an object or absent (JSON null counts as absent); `[]`, `""`, `0`, `false` are
  refused, not read as `{}`.
- message content (both routes): a string, or a list of text parts `[{"type": "text", "text": "..."}]` as OpenAI-
  compatible clients send; the parts' texts are joined with a newline (what vLLM does for text parts). Any other
  part type (image_url, input_audio, file, ...) is refused by name: this endpoint serves a text model.
"""

from typing import Any, Dict

SCORE_TOP_KEYS = ("input_data", "params")
SCORE_INPUT_KEYS = ("input_string", "parameters")


class ShapeError(ValueError):
    """A 400 naming `param`; server.py turns it into its ApiError (the server runs as __main__, so this module
    cannot import that class: it would be another one)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.message, self.param = message, param


def _error(message: str, param: str) -> ShapeError:
    return ShapeError(message, param)


def _unknown(obj: Dict[str, Any], allowed, where: str) -> None:
    unknown = sorted(set(obj) - set(allowed), key=str)
    if unknown:
        name = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise _error(f"{name} is not a known key; {where or 'the body'} takes only {list(allowed)}", name)


def check_score_shape(body: Dict[str, Any]) -> Dict[str, Any]:
    """Refuses unknown keys at the top level and in input_data; returns input_data.parameters as an object.
    A body without input_data is left to the caller's "input_data is required"."""
    if "input_data" not in body:
        return {}
    _unknown(body, SCORE_TOP_KEYS, "")
    data = body.get("input_data")
    if isinstance(data, dict):
        _unknown(data, SCORE_INPUT_KEYS, "input_data")
        params = data.get("parameters")
        if params is None:
            return {}
        if not isinstance(params, dict):
            raise _error(f"input_data.parameters must be an object ({{\"temperature\": ..., ...}}), got "
                         f"{type(params).__name__} {str(params)[:40]!r}", "input_data.parameters")
        return params
    return {}


def message_content(content: Any, where: str) -> str:
    """A message's content as text: a string, or the texts of a list of text parts."""
    import json

    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise _error(f"{where} must be a string or a non-empty list of text parts [{{\"type\": \"text\", \"text\": "
                     f"...}}], got {json.dumps(content)[:80]}", where)
    texts = []
    for i, part in enumerate(content):
        at = f"{where}[{i}]"
        if not isinstance(part, dict):
            raise _error(f"{at} must be an object {{\"type\": \"text\", \"text\": ...}}", at)
        kind = part.get("type")
        if kind != "text":
            raise _error(f"{at}.type {json.dumps(kind)} is not supported: this endpoint serves a text model and "
                         "takes only text parts", f"{at}.type")
        extra = sorted(set(part) - {"type", "text"})
        if extra:
            raise _error(f"{at}.{extra[0]} is not a key of a text part (type, text)", f"{at}.{extra[0]}")
        if not isinstance(part.get("text"), str):
            raise _error(f"{at}.text must be a string", f"{at}.text")
        texts.append(part["text"])
    return "\n".join(texts)
