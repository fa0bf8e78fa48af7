"""The endpoint's wire protocol (runner/local/endpoint/protocol.py), without a server: NaN / Infinity / overflowing
numbers, out-of-range sampling parameters, nesting, lone surrogates and the size limits are refused with 400/413
naming the parameter or the deployment.* limit."""

import json

import pytest

from runner.local.endpoint import protocol
from runner.local.endpoint.api_errors import ApiError
from runner.local.endpoint.generation import GREEDY_BELOW_TEMPERATURE, GenerationJob
from runner.local.endpoint.limits import RequestLimits
from runner.local.endpoint.protocol import parse_chat_request, parse_json, parse_request, parse_score_request
from tests.local.endpoint.test_hostile import CHAT, score_body


def refused(call, *args, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as err:
        call(*args, **kwargs)
    return err.value


# ---------------------------------------------------------------- parsing: numbers

@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e999"])
def test_json_that_holds_no_finite_number_is_a_400(literal):
    raw = b'{"messages": [{"role": "user", "content": "hi"}], "temperature": ' + literal.encode() + b"}"
    error = refused(parse_json, raw)
    assert error.status == 400 and error.param == "body"
    assert "finite" in error.message


def test_an_integer_of_more_digits_than_python_converts_is_a_400():
    error = refused(parse_json, b'{"max_tokens": ' + b"9" * 5000 + b"}")
    assert error.status == 400 and "not valid JSON" in error.message


@pytest.mark.parametrize("route,key,value,range_text", [
    ("score", "temperature", float("nan"), "[0, 100.0]"),
    ("score", "temperature", float("inf"), "[0, 100.0]"),
    ("score", "top_p", float("nan"), "(0, 1]"),
    ("score", "top_k", 10 ** 30, "[0, 1000000]"),
    ("score", "max_new_tokens", 10 ** 30, "[1, 1000000]"),
    ("chat", "temperature", float("nan"), "[0, 2.0]"),
    ("chat", "top_p", float("nan"), "(0, 1]"),
    ("chat", "max_tokens", 10 ** 30, "[1, 1000000]"),
])
def test_sampling_parameters_must_be_finite_and_in_range(route, key, value, range_text):
    if route == "score":
        error = refused(parse_score_request, score_body(**{key: value}))
        param = f"input_data.parameters.{key}"
    else:
        error = refused(parse_chat_request, {"messages": CHAT, key: value})
        param = key
    assert error.status == 400 and error.param == param
    assert param in error.message and range_text in error.message


def test_a_tiny_temperature_is_greedy_on_both_routes():
    _, score = parse_score_request(score_body(temperature=1e-38, do_sample=True))
    _, chat, _ = parse_chat_request({"messages": CHAT, "temperature": 1e-38})
    for settings in (score, chat):
        job = GenerationJob([1], 4, do_sample=settings["do_sample"], temperature=settings["temperature"])
        assert job.greedy
    assert not GenerationJob([1], 4, do_sample=True, temperature=GREEDY_BELOW_TEMPERATURE).greedy


# ---------------------------------------------------------------- parsing: structure and text

@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_deeply_nested_json_is_a_400_not_a_recursion_error(opener):
    depth = 200_000
    closer = b"]" if opener == b"[" else b"}"
    error = refused(parse_json, opener * depth + b"1" + closer * depth)
    assert error.status == 400 and error.param == "body" and "nested too deeply" in error.message


def test_a_lone_surrogate_is_a_400_naming_where_it_is():
    body = parse_json(b'{"messages": [{"role": "user", "content": "ok \\ud800 there"}]}')
    error = refused(parse_chat_request, body)
    assert error.status == 400 and error.param == "messages[0].content" and "surrogate" in error.message
    stop = refused(parse_score_request, score_body(stop=["\ud83d"]))
    assert stop.param == "input_data.parameters.stop"
    # an error message quoting the client's surrogate can still be sent (ASCII-escaped JSON)
    unknown = refused(parse_score_request, score_body(**{"\udc00": 1}))
    assert json.loads(unknown.response().body)["error"]["code"] == 400


# ---------------------------------------------------------------- limits before tokenizing

def test_too_many_messages_are_refused_before_any_is_looked_at():
    flood = [{"role": "user", "content": ""}] * 140_000
    error = refused(parse_chat_request, {"messages": flood})
    assert error.status == 413 and error.param == "messages"
    assert "140000 messages" in error.message and "deployment.max_messages" in error.message and "256" in error.message
    small = RequestLimits(max_messages=2)
    assert refused(parse_score_request, score_body(CHAT * 3), small).status == 413
    assert parse_score_request(score_body(CHAT * 2), small)[0] == CHAT * 2


def test_prompt_characters_and_stop_strings_have_limits():
    limits = RequestLimits(max_prompt_chars=100, max_stop_strings=2, max_stop_chars=10)
    long = refused(parse_chat_request, {"messages": [{"role": "user", "content": "x" * 60}] * 2}, limits)
    assert long.status == 413 and "deployment.max_prompt_chars" in long.message and "100" in long.message
    many = refused(parse_chat_request, {"messages": CHAT, "stop": ["a", "b", "c"]}, limits)
    assert many.status == 400 and many.param == "stop" and "deployment.max_stop_strings" in many.message
    huge = refused(parse_score_request, score_body(stop=["y" * 1_000_000]))
    assert huge.status == 400 and "1000000 characters" in huge.message and "deployment.max_stop_chars" in huge.message
    assert parse_chat_request({"messages": CHAT, "stop": ["0123456789"]}, limits)[1]["stop"] == ["0123456789"]


def test_limits_are_checked():
    with pytest.raises(ValueError, match="deployment.max_messages"):
        RequestLimits(max_messages=0)
    with pytest.raises(ValueError, match="deployment.max_prompt_tokens"):
        RequestLimits(max_prompt_tokens=-1)


# ---------------------------------------------------------------- an unexpected error (in-process server)

def test_a_message_flood_is_refused_before_it_is_parsed():
    """140,000 empty messages (4 MB) cost ~100 ms of CPU to parse: the "role" keys are counted first. Cut short,
    the body is not even valid JSON any more, and the refusal is the same: it was never parsed."""
    flood = json.dumps({"messages": [{"role": "user", "content": ""}] * 140_000}, separators=(",", ":")).encode()
    for body in (flood, flood[:-10]):
        error = refused(parse_request, "chat", body)
        assert error.status == 413 and error.param == "messages" and "140000" in error.message
        assert "deployment.max_messages" in error.message
    # keys spelled otherwise are not counted, and the parse refuses them the same way
    spaced = json.dumps({"messages": [{"role": "user", "content": ""}] * 3000}).replace('"role":', '"role"\n:')
    assert len(spaced) > protocol.INLINE_PARSE_BYTES
    after_parse = refused(parse_request, "chat", spaced.encode())
    assert after_parse.status == 413 and "holds 3000 messages" in after_parse.message
