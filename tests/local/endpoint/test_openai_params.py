"""Every OpenAI chat-completions field is implemented and effective, or refused with a 400 that names it: nothing a
client asks for is silently ignored (presence/frequency penalties and logit_bias are implemented)."""

import pytest

from runner.local.endpoint import openai_params
from runner.local.endpoint.generation import GenerationJob
from runner.local.endpoint.api_errors import ApiError
from runner.local.endpoint.protocol import parse_chat_request
from tests.conftest import run_batch

CHAT = [{"role": "user", "content": "Tell me about lists and sets."}]

# field -> a value a client would send that this endpoint cannot honour
REFUSED = {
    "logprobs": True, "top_logprobs": 3, "seed": 7, "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto",
    "functions": [{"name": "f"}], "function_call": "auto", "store": True, "metadata": {"a": "b"},
    "service_tier": "flex", "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "x"}, "reasoning_effort": "high", "verbosity": "low",
    "web_search_options": {}, "best_of": 2, "echo": True, "typo_temperature": 0.5,
}
# field -> a value that is implemented, or asks for nothing this endpoint lacks
ACCEPTED = {
    "model": "demo", "max_tokens": 5, "max_completion_tokens": 5, "temperature": 0.5, "top_p": 0.9, "n": 2,
    "stop": ["\n"], "stream": True, "stream_options": {"include_usage": True}, "presence_penalty": 1.5,
    "frequency_penalty": -0.5, "logit_bias": {"17": -100}, "user": "u-1", "safety_identifier": "s",
    "prompt_cache_key": "k", "logprobs": False, "store": False, "service_tier": "auto", "modalities": ["text"],
    "response_format": {"type": "text"}, "tool_choice": "none", "parallel_tool_calls": True, "seed": None,
    "top_k": 5,
}


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_a_field_that_would_be_ignored_is_refused_by_name(field):
    with pytest.raises(ApiError) as err:
        parse_chat_request({"messages": CHAT, field: REFUSED[field]})
    assert err.value.status == 400 and err.value.param == field and field in err.value.message


def test_every_field_openai_defines_is_classified():
    known = set(openai_params.IMPLEMENTED) | set(openai_params.NO_EFFECT) | set(openai_params.REFUSED)
    documented = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
                  "stream", "stream_options", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
                  "top_logprobs", "seed", "user", "response_format", "tools", "tool_choice", "parallel_tool_calls",
                  "functions", "function_call", "service_tier", "store", "metadata", "modalities", "audio",
                  "prediction", "reasoning_effort", "web_search_options", "verbosity", "safety_identifier",
                  "prompt_cache_key"}
    assert documented <= known


def test_implemented_and_neutral_fields_are_accepted_and_reach_the_settings():
    messages, settings, options = parse_chat_request({"messages": CHAT, **ACCEPTED})
    assert settings["presence_penalty"] == 1.5 and settings["frequency_penalty"] == -0.5
    assert settings["logit_bias"] == {17: -100.0} and settings["top_k"] == 5
    assert options["n"] == 2 and options["stream"] is True and options["include_usage"] is True


@pytest.mark.parametrize("body, param", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": "1"}, "frequency_penalty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"3": 101}}, "logit_bias['3']"),
    ({"logit_bias": [1]}, "logit_bias"), ({"stream_options": {"include_obfuscation": True}},
                                          "stream_options.include_obfuscation"),
    ({"user": 5}, "user"),
])
def test_out_of_range_values_are_refused_with_their_name(body, param):
    with pytest.raises(ApiError) as err:
        parse_chat_request({"messages": CHAT, **body})
    assert err.value.status == 400 and err.value.param == param


def test_penalties_follow_openais_definition_on_generated_tokens_only():
    import torch

    from runner.local.endpoint.penalties import TokenPenalties

    jobs = [GenerationJob([1, 2], 4, presence_penalty=0.5, frequency_penalty=0.25),
            GenerationJob([3, 4], 4), GenerationJob([3, 4], 4, logit_bias={9: 3.0, 0: -100.0})]
    # prompt width 2: tokens 1-4 are prompts (never counted); row 0 generated 5, 5, 7
    input_ids = torch.tensor([[1, 2, 5, 5, 7], [3, 4, 5, 5, 7], [3, 4, 1, 1, 1]])
    scores = torch.zeros(3, 10)
    out = TokenPenalties(jobs, prompt_width=2)(input_ids, scores.clone())
    expected0 = torch.zeros(10)
    expected0[5] = -(2 * 0.25 + 0.5)
    expected0[7] = -(1 * 0.25 + 0.5)
    assert torch.equal(out[0], expected0)
    assert torch.equal(out[1], torch.zeros(10))  # a row without penalties is untouched
    assert out[2, 9] == 3.0 and out[2, 0] == -100.0 and out[2, 1] == 0.0


def _job(generator, max_new, **kw):
    return GenerationJob(generator.encode_chat(CHAT), max_new, **kw)


@pytest.mark.slow
def test_penalties_and_logit_bias_change_greedy_replies_and_leave_other_rows_alone(generator):
    # The penalties act on tokens the reply already holds: 24 greedy tokens of the random-init model held no repeat
    # with PyPI's (CUDA-build) torch on Python 3.12 and 3.13, so nothing was penalised; 128 do.
    plain = run_batch(generator, [_job(generator, 128)])[0]
    plain_ids = generator.tokenizer(plain.text, add_special_tokens=False)["input_ids"]
    penalised, neighbour = run_batch(generator, [_job(generator, 128, frequency_penalty=2.0, presence_penalty=2.0),
                                                 _job(generator, 128)])
    assert neighbour.text == plain.text  # same batch, no penalty: the same reply
    assert penalised.text != plain.text
    pen_ids = generator.tokenizer(penalised.text, add_special_tokens=False)["input_ids"]
    assert len(set(pen_ids)) / max(len(pen_ids), 1) > len(set(plain_ids)) / max(len(plain_ids), 1)

    # The greedy reply's first token, made impossible. Re-tokenizing a reply need not give the ids generated (a
    # SentencePiece vocabulary has several ids for one text), so the first token is found by generating one, and
    # every id that decodes to the same text is banned.
    first = run_batch(generator, [_job(generator, 1)])[0].text
    banned = [i for i in range(len(generator.tokenizer)) if generator.tokenizer.decode([i]) == first]
    assert banned
    avoided = run_batch(generator, [_job(generator, 1, logit_bias={i: -100.0 for i in banned})])[0]
    assert avoided.completion_tokens == 1 and avoided.text != first
    forced_token = 300
    forced = run_batch(generator, [_job(generator, 6, logit_bias={forced_token: 100.0})])[0]
    assert forced.completion_tokens == 6 and forced.text == generator.tokenizer.decode([forced_token] * 6)
