"""The wire protocol: the request bodies of `/score` (Azure ML chat-completion scoring) and
`/v1/chat/completions` (OpenAI), parsed and checked without a model (400/413 as ApiError), and the OpenAI
response and stream bodies.

Hostile input harms only its own request: every sampling parameter must be finite and in range (NaN, Infinity and
numbers beyond a float are refused while parsing), a body nested too deeply or text with a lone surrogate is a 400,
and the size limits (limits.RequestLimits: messages, prompt characters, stop strings) are checked before anything is
tokenized.
"""

import json
import math
from typing import Any, Dict, List, Optional, Tuple

from runner.local.endpoint.api_errors import ApiError
from runner.local.endpoint.limits import DEFAULT_LIMITS, RequestLimits
from runner.local.endpoint.wire_shapes import ShapeError, check_score_shape, message_content

DEPLOYMENT_HEADER = "azureml-model-deployment"
ROLES = ("system", "user", "assistant")
SCORE_PARAMETERS = ("temperature", "top_p", "top_k", "do_sample", "max_new_tokens", "return_full_text", "stop")
MAX_CHOICES = 8
# Larger bodies are parsed in parser processes (parse_pool.py) and have their "role" keys counted first: json.loads
# holds the GIL, and one 4 MB body of 140,000 empty messages took ~120 ms of it.
INLINE_PARSE_BYTES = 64 * 1024
# Ranges that no request may leave: finite, and far from where a float32 division or an int overflows.
MAX_TEMPERATURE = {"score": 100.0, "chat": 2.0}  # the chat route keeps OpenAI's range
MAX_TOP_K = 1_000_000
MAX_NEW_TOKENS = 1_000_000  # the model's context is the real bound; this only keeps the number sane


def _number(value, path: str, *, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"{path} must be a number, got {json.dumps(value)}", param=path)
    # NaN compares false with everything: without the isfinite it would pass any range check
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ApiError(400, f"{path} must be in {bracket}{low}, {high}], got {value}", param=path)
    return float(value)


def _integer(value, path: str, *, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"{path} must be an integer, got {json.dumps(value)}", param=path)
    if value < low or (high is not None and value > high):
        raise ApiError(400, f"{path} must be an integer in [{low}, {high if high is not None else 'inf'}], got {value}",
                       param=path)
    return value


def _boolean(value, path: str) -> bool:
    if not isinstance(value, bool):
        raise ApiError(400, f"{path} must be true or false, got {json.dumps(value)}", param=path)
    return value


def _object(value, path: str) -> Dict[str, Any]:
    if not isinstance(value, dict):
        raise ApiError(400, f"{path} must be a JSON object, got {type(value).__name__}", param=path)
    return value


def _text(value: str, path: str) -> str:
    """JSON lets a string hold a lone surrogate ("\\ud800"): no tokenizer can encode it, so it is refused here."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(400, f"{path} holds a lone surrogate (\\u{ord(value[exc.start]):04x}) at character "
                            f"{exc.start}; text must be valid Unicode", param=path) from None
    return value


def _stop_strings(value, path: str, limits: RequestLimits = DEFAULT_LIMITS) -> List[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    most = limits.max_stop_strings
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise ApiError(400, f"{path} must be a non-empty string or a list of at most {most} of them", param=path)
    if len(items) > most:
        raise ApiError(400, f"{path} holds {len(items)} stop strings; this endpoint accepts at most {most} "
                            f"(deployment.max_stop_strings)", param=path)
    for i, stop in enumerate(items):
        if len(stop) > limits.max_stop_chars:
            raise ApiError(400, f"{path}[{i}] is {len(stop)} characters; a stop string may have at most "
                                f"{limits.max_stop_chars} (deployment.max_stop_chars)", param=path)
        _text(stop, path)
    return items


def _shape(check, *args):
    try:
        return check(*args)
    except ShapeError as exc:
        raise ApiError(400, exc.message, param=exc.param) from None


def parse_messages(value, path: str, limits: RequestLimits = DEFAULT_LIMITS) -> List[Dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"{path} must be a non-empty list of {{role, content}} messages", param=path)
    if len(value) > limits.max_messages:  # before looking at any of them
        raise ApiError(413, f"{path} holds {len(value)} messages; this endpoint accepts at most "
                            f"{limits.max_messages} (deployment.max_messages)", param=path, kind="request_too_large")
    messages, chars = [], 0
    for i, message in enumerate(value):
        where = f"{path}[{i}]"
        _object(message, where)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {list(ROLES)}, got {json.dumps(role)}", param=f"{where}.role")
        content = _shape(message_content, content, f"{where}.content")  # a string, or text parts (wire_shapes.py)
        chars += len(content)
        if chars > limits.max_prompt_chars:
            raise ApiError(413, f"{path} holds more than {limits.max_prompt_chars} characters of content; this "
                                f"endpoint accepts at most {limits.max_prompt_chars} (deployment.max_prompt_chars)",
                           param=path, kind="request_too_large")
        messages.append({"role": role, "content": _text(content, f"{where}.content")})
    return messages


def _refuse_constant(name: str):
    raise ApiError(400, f"the request body holds {name}: numbers must be finite (JSON has no NaN or Infinity)",
                   param="body")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 is a valid JSON number that no float holds
        raise ApiError(400, f"the number {text[:40]} in the request body is beyond the range of a float; numbers "
                            f"must be finite", param="body")
    return value


def parse_json(raw: bytes) -> Any:
    """The body as JSON; refused with 400: invalid JSON, NaN / Infinity / overflowing numbers (Python's json takes
    them), integers of more digits than Python converts, and nesting deeper than the parser's recursion limit."""
    try:
        return json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply (JSON arrays/objects inside each other); a "
                            "request needs no more than a few levels", param="body") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, and ints beyond sys.get_int_max_str_digits
        raise ApiError(400, f"the request body is not valid JSON: {exc}", param="body") from None


def parse_score_request(body, limits: RequestLimits = DEFAULT_LIMITS) -> Tuple[List[Dict[str, str]], Dict[str, Any]]:
    """The Azure ML chat-completion scoring format → (messages, sampling settings)."""
    _object(body, "body")
    score_parameters = _shape(check_score_shape, body)  # unknown keys, non-object parameters (wire_shapes.py)
    if "input_data" not in body:
        raise ApiError(400, "input_data is required: {\"input_data\": {\"input_string\": [...], \"parameters\": {...}}}",
                       param="input_data")
    data = _object(body["input_data"], "input_data")
    if "input_string" not in data:
        raise ApiError(400, "input_data.input_string is required (a list of {role, content} messages)",
                       param="input_data.input_string")
    turns = data["input_string"]
    if isinstance(turns, list) and turns and isinstance(turns[0], list):  # the notebook's nested form
        if len(turns) != 1:
            raise ApiError(400, f"input_data.input_string holds {len(turns)} conversations; send exactly one",
                           param="input_data.input_string")
        messages = parse_messages(turns[0], "input_data.input_string[0]", limits)
    else:
        messages = parse_messages(turns, "input_data.input_string", limits)
    if "params" in body and body["params"] is not None:
        _object(body["params"], "params")
    params = score_parameters
    where = "input_data.parameters"
    unknown = sorted(set(params) - set(SCORE_PARAMETERS))
    if unknown:
        raise ApiError(400, f"{where}.{unknown[0]} is not a supported parameter; supported: {list(SCORE_PARAMETERS)}",
                       param=f"{where}.{unknown[0]}")
    settings: Dict[str, Any] = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                                "max_new_tokens": None, "stop": []}
    if "temperature" in params:
        settings["temperature"] = _number(params["temperature"], f"{where}.temperature", low=0,
                                          high=MAX_TEMPERATURE["score"])
    if "top_p" in params:
        settings["top_p"] = _number(params["top_p"], f"{where}.top_p", low=0, high=1, low_open=True)
    if "top_k" in params:
        settings["top_k"] = _integer(params["top_k"], f"{where}.top_k", low=0, high=MAX_TOP_K)
    if "do_sample" in params:
        settings["do_sample"] = _boolean(params["do_sample"], f"{where}.do_sample")
    if "max_new_tokens" in params:
        settings["max_new_tokens"] = _integer(params["max_new_tokens"], f"{where}.max_new_tokens", low=1,
                                              high=MAX_NEW_TOKENS)
    if "return_full_text" in params and _boolean(params["return_full_text"], f"{where}.return_full_text"):
        raise ApiError(400, f"{where}.return_full_text=true is not supported: the output is the reply only",
                       param=f"{where}.return_full_text")
    settings["stop"] = _stop_strings(params.get("stop"), f"{where}.stop", limits)
    return messages, settings


ROLE_KEYS = (b'"role":', b'"role" :')  # in JSON text a string followed by ":" is a key, never a value


def parse_request(route: str, raw: bytes, limits: RequestLimits = DEFAULT_LIMITS):
    """The body of a request to `route` ("score" or "chat"), parsed and checked.

    A body with more "role" keys than messages are allowed is refused before it is parsed: 140,000 empty messages
    are 4 MB that take ~100 ms of CPU to turn into objects, and counting the key takes ~4 ms. (A key spelled
    otherwise, `"role"  :` or with escapes, is not counted; such a body is refused after parsing instead.)"""
    roles = sum(raw.count(form) for form in ROLE_KEYS) if len(raw) > INLINE_PARSE_BYTES else 0
    if roles > limits.max_messages:
        where = "input_data.input_string" if route == "score" else "messages"
        raise ApiError(413, f"the request body holds {roles} \"role\" keys, so more messages than this endpoint "
                            f"accepts: at most {limits.max_messages} (deployment.max_messages)", param=where,
                       kind="request_too_large")
    parse = parse_score_request if route == "score" else parse_chat_request
    return parse(parse_json(raw), limits)


def parse_chat_request(body, limits: RequestLimits = DEFAULT_LIMITS
                       ) -> Tuple[List[Dict[str, str]], Dict[str, Any], Dict[str, Any]]:
    """An OpenAI chat.completions request → (messages, sampling settings, options {model, n, stream, usage})."""
    _object(body, "body")
    if "messages" not in body:
        raise ApiError(400, "messages is required (a list of {role, content})", param="messages")
    messages = parse_messages(body["messages"], "messages", limits)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model must be a string", param="model")
    if model is not None:
        _text(model, "model")
    temperature = 1.0 if body.get("temperature") is None else _number(body["temperature"], "temperature", low=0,
                                                                       high=MAX_TEMPERATURE["chat"])
    top_p = 1.0 if body.get("top_p") is None else _number(body["top_p"], "top_p", low=0, high=1, low_open=True)
    max_tokens = None
    for key in ("max_completion_tokens", "max_tokens"):
        if body.get(key) is not None:
            max_tokens = _integer(body[key], key, low=1, high=MAX_NEW_TOKENS)
    n = 1 if body.get("n") is None else _integer(body["n"], "n", low=1, high=MAX_CHOICES)
    stream = False if body.get("stream") is None else _boolean(body["stream"], "stream")
    stream_options = _object(body.get("stream_options") or {}, "stream_options")
    top_k = 0 if body.get("top_k") is None else _integer(body["top_k"], "top_k", low=0, high=MAX_TOP_K)
    settings = {"do_sample": temperature > 0, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                "max_new_tokens": max_tokens, "stop": _stop_strings(body.get("stop"), "stop", limits),
                **_openai_extras(body)}
    options = {"model": model, "n": n, "stream": stream, "include_usage": bool(stream_options.get("include_usage"))}
    return messages, settings, options



def _openai_extras(body) -> Dict[str, Any]:
    """Every other OpenAI field: refused by name unless implemented (runner/local/endpoint/openai_params.py);
    the penalties and logit_bias go to the generation."""
    from runner.local.endpoint import openai_params

    try:
        openai_params.check_fields(body)
        return {**openai_params.penalties(body), "logit_bias": openai_params.logit_bias(body)}
    except openai_params.FieldError as exc:
        raise ApiError(400, str(exc), param=exc.param) from None


# ---- OpenAI response bodies

def chat_completion(completion_id: str, created: int, model: str, results) -> Dict[str, Any]:
    prompt_tokens = results[0].prompt_tokens
    completion_tokens = sum(r.completion_tokens for r in results)
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                     "finish_reason": r.finish_reason, "logprobs": None} for i, r in enumerate(results)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def chunk_event(completion_id: str, created: int, model: str, choices, usage=None) -> str:
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def error_event(error: ApiError) -> str:
    return "data: " + json.dumps({"error": {"message": error.message, "type": error.kind,
                                            "code": error.status}}) + "\n\n"
