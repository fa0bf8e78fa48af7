"""Loose shapes on the wire are refused by name; OpenAI-style text parts are accepted (wire_shapes.py)."""

import pytest

from runner.local.endpoint.api_errors import ApiError
from runner.local.endpoint.protocol import parse_chat_request, parse_score_request

CHAT = [{"role": "user", "content": "hi"}]


def _refused(parse, body) -> ApiError:
    with pytest.raises(ApiError) as err:
        parse(body)
    assert err.value.status == 400
    return err.value


@pytest.mark.parametrize("parameters", [[], "", 0, False, "{}", [1]])
def test_score_parameters_must_be_an_object(parameters):
    err = _refused(parse_score_request, {"input_data": {"input_string": CHAT, "parameters": parameters}})
    assert err.param == "input_data.parameters" and "must be an object" in err.message


def test_score_parameters_absent_or_null_mean_defaults():
    for data in ({"input_string": CHAT}, {"input_string": CHAT, "parameters": None}):
        messages, settings = parse_score_request({"input_data": data})
        assert messages == CHAT and settings["do_sample"] is False


@pytest.mark.parametrize("body, name", [
    ({"input_data": {"input_string": CHAT}, "paramters": {}}, "paramters"),
    ({"input_data": {"input_string": CHAT}, "params": {}, "extra": 1}, "extra"),
    ({"input_data": {"input_string": CHAT, "paramters": {"temperature": 0.5}}}, "input_data.paramters"),
    ({"input_data": {"input_string": CHAT, "max_new_tokens": 5}}, "input_data.max_new_tokens"),
])
def test_score_unknown_keys_are_refused_by_name(body, name):
    err = _refused(parse_score_request, body)
    assert err.param == name and name in err.message


def _parts(*parts):
    return [{"role": "user", "content": list(parts)}]


@pytest.mark.parametrize("route", ["score", "chat"])
def test_text_parts_are_accepted(route):
    turns = _parts({"type": "text", "text": "Hello"}, {"type": "text", "text": "there"})
    if route == "score":
        messages, _ = parse_score_request({"input_data": {"input_string": turns}})
    else:
        messages, _, _ = parse_chat_request({"messages": turns})
    assert messages == [{"role": "user", "content": "Hello\nthere"}]


@pytest.mark.parametrize("part, param", [
    ({"type": "image_url", "image_url": {"url": "http://x/y.png"}}, "messages[0].content[1].type"),
    ({"type": "input_audio", "input_audio": {}}, "messages[0].content[1].type"),
    ({"type": "text", "text": 5}, "messages[0].content[1].text"),
    ({"type": "text", "text": "a", "cache": 1}, "messages[0].content[1].cache"),
    ("plain string part", "messages[0].content[1]"),
])
def test_other_parts_are_refused_by_name(part, param):
    err = _refused(parse_chat_request, {"messages": _parts({"type": "text", "text": "ok"}, part)})
    assert err.param == param
    if "type" in param:
        assert part["type"] in err.message


@pytest.mark.parametrize("content", [5, None, [], {"type": "text", "text": "x"}])
def test_content_that_is_neither_string_nor_parts_is_refused(content):
    err = _refused(parse_chat_request, {"messages": [{"role": "user", "content": content}]})
    assert err.param == "messages[0].content"
