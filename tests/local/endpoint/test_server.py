"""The local endpoint as a real server process on 127.0.0.1: the openai client, /score in both forms, every error
case, traffic routing, readiness, batching under concurrency, the key's secrecy, and a clean delete."""

import json
import signal
import stat
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from runner.local.endpoint import manager
from runner.local.endpoint.manager import (EndpointError, find_endpoint, launch_server, read_key, start_endpoint,
                                           stop_endpoint, wait_ready)
from runner.local.endpoint.settings import EndpointSettings

pytestmark = pytest.mark.slow

CHAT = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is a set?"}]


def score_body(turns, **parameters):
    return {"input_data": {"input_string": turns, "parameters": parameters}, "params": {}}


@pytest.fixture(scope="module")
def endpoint(tiny_model_dir, tmp_path_factory):
    """Two deployments of the tiny model: blue takes all traffic, green none (reachable only by the header)."""
    state_dir = tmp_path_factory.mktemp("endpoints")
    state = start_endpoint(EndpointSettings(name="test-endpoint", traffic={"blue": 100, "green": 0},
                                            deployments={"blue": str(tiny_model_dir), "green": str(tiny_model_dir)},
                                            batch_window_ms=20.0), state_dir=state_dir)
    state["state_dir"] = str(state_dir)
    yield state
    stop_endpoint(state["name"], state_dir=state_dir)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def auth(state, **extra):
    return {"Authorization": f"Bearer {read_key(state)}", **extra}


def post(state, path, body, headers=None, **kw):
    return httpx.post(state["url"] + path, json=body, headers=auth(state) if headers is None else headers,
                      timeout=60, **kw)


def prompt_tokens(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------- happy paths

def test_openai_client_chat_completion(endpoint, tokenizer):
    import openai

    client = openai.OpenAI(base_url=endpoint["openai_base_url"], api_key=read_key(endpoint))
    reply = client.chat.completions.create(model="blue", messages=CHAT, max_tokens=8, temperature=0)
    assert reply.object == "chat.completion" and reply.model == "blue"
    assert isinstance(reply.choices[0].message.content, str) and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == prompt_tokens(tokenizer, CHAT)
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    two = client.chat.completions.create(model="blue", messages=CHAT, max_tokens=4, n=2, temperature=0.9)
    assert [c.index for c in two.choices] == [0, 1]
    assert 2 <= two.usage.completion_tokens <= 8  # counted over both choices


def test_openai_client_streaming_adds_up_to_the_same_reply(endpoint):
    import openai

    client = openai.OpenAI(base_url=endpoint["openai_base_url"], api_key=read_key(endpoint))
    whole = client.chat.completions.create(model="blue", messages=CHAT, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model="blue", messages=CHAT, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed in pieces
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_score_accepts_the_nested_and_the_flat_form(endpoint):
    nested = post(endpoint, "/score", score_body([CHAT], temperature=0.6, top_p=0.9, do_sample=False, max_new_tokens=12))
    flat = post(endpoint, "/score", score_body(CHAT, max_new_tokens=12))
    assert nested.status_code == 200 and flat.status_code == 200, (nested.text, flat.text)
    assert set(nested.json()) == {"output"} and isinstance(nested.json()["output"], str)
    assert nested.json() == flat.json()  # both greedy: same conversation, same reply
    sampled = post(endpoint, "/score", score_body([CHAT], temperature=0.6, top_p=0.9, do_sample=True,
                                                  max_new_tokens=12))
    assert sampled.status_code == 200 and isinstance(sampled.json()["output"], str)


def test_concurrent_requests_share_generate_calls(endpoint):
    before = httpx.get(endpoint["url"] + "/health/ready", headers=auth(endpoint)).json()["batching"][0]
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: post(endpoint, "/score", score_body(
            [[{"role": "user", "content": f"question {i}"}]], max_new_tokens=16 + i)).status_code, range(8)))
    after = httpx.get(endpoint["url"] + "/health/ready", headers=auth(endpoint)).json()["batching"][0]
    assert codes == [200] * 8
    assert after["requests"] - before["requests"] == 8
    assert after["batches"] - before["batches"] < 8, "concurrent requests were run one by one"
    assert after["largest_batch"] > 1


# ---------------------------------------------------------------- routing

def test_traffic_split_and_deployment_header(endpoint):
    body = score_body([CHAT], max_new_tokens=2)
    routed = {post(endpoint, "/score", body).headers["azureml-model-deployment"] for _ in range(6)}
    assert routed == {"blue"}  # 100/0: every unpinned request goes to blue
    pinned = post(endpoint, "/score", body, headers=auth(endpoint, **{"azureml-model-deployment": "green"}))
    assert pinned.status_code == 200 and pinned.headers["azureml-model-deployment"] == "green"
    unknown = post(endpoint, "/score", body, headers=auth(endpoint, **{"azureml-model-deployment": "purple"}))
    assert unknown.status_code == 404 and "purple" in unknown.json()["error"]["message"]


# ---------------------------------------------------------------- errors: JSON, specific, and the server keeps serving

@pytest.mark.parametrize("path, body, param", [
    ("/score", b"{not json", "body"),
    ("/score", {"input": []}, "input_data"),
    ("/score", {"input_data": {"parameters": {}}}, "input_data.input_string"),
    ("/score", score_body([[{"role": "robot", "content": "hi"}]]), "input_data.input_string[0][0].role"),
    ("/score", score_body([{"role": "user", "content": 5}]), "input_data.input_string[0].content"),
    ("/score", score_body([CHAT], temperature="hot"), "input_data.parameters.temperature"),
    ("/score", score_body([CHAT], max_new_tokens=0), "input_data.parameters.max_new_tokens"),
    ("/score", score_body([CHAT], beam_width=3), "input_data.parameters.beam_width"),
    ("/score", score_body([CHAT, CHAT]), "input_data.input_string"),
    ("/score", {"input_data": {"input_string": [CHAT], "parameters": []}}, "input_data.parameters"),
    ("/score", {"input_data": {"input_string": [CHAT], "paramters": {}}}, "input_data.paramters"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0].type"),
    ("/v1/chat/completions", {"model": "blue"}, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "n": 0}, "n"),
    ("/v1/chat/completions", {"messages": CHAT, "top_p": 0}, "top_p"),
])
def test_bad_requests_get_400_naming_the_field(endpoint, path, body, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(endpoint["url"] + path, headers=auth(endpoint, **{"Content-Type": "application/json"}),
                   timeout=30, **kw)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert param == "body" or param in error["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-the-key"}, {"Authorization": "Basic abc"}])
def test_missing_or_wrong_key_is_401(endpoint, headers):
    r = post(endpoint, "/score", score_body([CHAT]), headers=headers)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"


def test_openai_client_with_a_wrong_key_gets_an_authentication_error(endpoint):
    import openai

    client = openai.OpenAI(base_url=endpoint["openai_base_url"], api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="blue", messages=CHAT, max_tokens=2)


def test_openai_client_fields_are_honoured_or_refused_by_name(endpoint):
    """Through the openai client: the penalties change a greedy reply, tools are refused naming `tools`."""
    import openai

    client = openai.OpenAI(base_url=endpoint["openai_base_url"], api_key=read_key(endpoint), max_retries=0)
    # The penalties act on tokens the reply already holds: 24 greedy tokens of the random-init model held no repeat
    # on Python 3.12 (so nothing to penalise); 128 do (a random model's greedy reply falls into loops).
    plain = client.chat.completions.create(model="blue", messages=CHAT, max_tokens=128, temperature=0)
    penalised = client.chat.completions.create(model="blue", messages=CHAT, max_tokens=128, temperature=0,
                                               presence_penalty=2.0, frequency_penalty=2.0)
    assert penalised.choices[0].message.content != plain.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="blue", messages=CHAT, max_tokens=2,
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert err.value.status_code == 400 and err.value.body["param"] == "tools"
    too_big = post(endpoint, "/v1/chat/completions", {"messages": CHAT, "logit_bias": {"999999": 5}})
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "logit_bias"


def test_beyond_the_context_is_413(endpoint):
    too_many = post(endpoint, "/score", score_body([CHAT], max_new_tokens=5000))
    assert too_many.status_code == 413 and too_many.json()["error"]["param"] == "max_new_tokens"
    assert "context" in too_many.json()["error"]["message"]
    long_prompt = [{"role": "user", "content": "tuple dict list " * 2000}]
    r = post(endpoint, "/v1/chat/completions", {"model": "blue", "messages": long_prompt})
    assert r.status_code == 413 and r.json()["error"]["param"] == "messages"


def test_server_keeps_serving_after_errors(endpoint):
    assert httpx.post(endpoint["scoring_uri"], content=b"garbage", headers=auth(endpoint)).status_code == 400
    assert httpx.get(endpoint["url"] + "/health/ready").status_code == 200
    assert post(endpoint, "/score", score_body([CHAT], max_new_tokens=3)).status_code == 200


def test_key_file_is_private_and_the_key_never_logged(endpoint):
    key_file = Path(endpoint["key_file"])
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    state_file = Path(endpoint["state_dir"]) / "test-endpoint.json"
    saved = json.loads(state_file.read_text())
    assert saved["scoring_uri"] == endpoint["scoring_uri"] and saved["pid"] == endpoint["pid"]
    key = read_key(endpoint)
    assert key not in state_file.read_text()
    assert key not in Path(endpoint["log_file"]).read_text()


# ---------------------------------------------------------------- readiness, timeout, lifecycle (own servers)

def test_readiness_is_503_while_loading_then_200_and_timeouts_are_408(tiny_model_dir, tmp_path):
    state = launch_server(EndpointSettings(name="slow-loader", deployments={"demo": str(tiny_model_dir)},
                                           traffic={"demo": 100}, host="127.0.0.1", port=0, request_timeout_ms=1,
                                           max_batch_size=4, batch_window_ms=5, load_delay_s=3), state_dir=tmp_path)
    try:
        assert httpx.get(state["url"] + "/health/live").status_code == 200
        loading = httpx.get(state["url"] + "/health/ready", headers=auth(state))
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        anonymous = httpx.get(state["url"] + "/health/ready")
        assert anonymous.status_code == 503 and anonymous.json() == {"status": "not ready"}
        early = post(state, "/score", score_body([CHAT], max_new_tokens=4))
        assert early.status_code == 503 and "loading" in early.json()["error"]["message"]
        wait_ready(state, timeout_s=120, progress=False)
        assert httpx.get(state["url"] + "/health/ready").status_code == 200
        late = post(state, "/score", score_body([CHAT], max_new_tokens=50))
        assert late.status_code == 408 and "1 ms" in late.json()["error"]["message"]
        # deployment.keep_alive=true: serve until Ctrl-C, then delete (here in a child process that gets SIGINT)
        keeper = subprocess.Popen(
            [sys.executable, "-c", "import json, sys; from runner.local.endpoint.manager import serve_until_interrupted; "
             "print(json.dumps(serve_until_interrupted(json.loads(sys.argv[1]))))", json.dumps(state)],
            stdout=subprocess.PIPE, text=True, bufsize=1)
        assert "Ctrl-C to delete" in keeper.stdout.readline()
        assert manager._listening("127.0.0.1", state["port"])  # still serving while kept alive
        keeper.send_signal(signal.SIGINT)
        out = json.loads(keeper.communicate(timeout=60)[0].strip().splitlines()[-1])
        assert out["deleted"] is True and out["how"] == "terminated"
    finally:
        stop_endpoint(state, state_dir=tmp_path)
    assert not manager._listening("127.0.0.1", state["port"])
    assert not manager._is_our_server(state["pid"], "slow-loader")


def test_startup_failure_is_reported_and_cleaned_up(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(EndpointError, match="failed to start") as err:
        start_endpoint(EndpointSettings(name="broken-ep", deployments={"demo": str(broken)}, traffic={"demo": 100}),
                       state_dir=tmp_path / "state", startup_timeout_s=60)
    assert "Traceback" in str(err.value) or "Error" in str(err.value)  # the server's own log tail
    assert not (tmp_path / "state" / "broken-ep.key").exists()
    assert not (tmp_path / "state" / "broken-ep.json").exists()
    assert not (tmp_path / "state" / "broken-ep.settings.json").exists()


def test_bad_endpoint_definitions_are_refused_before_starting(tmp_path, tiny_model_dir):
    cases = [("x", {"demo": str(tiny_model_dir)}, {"demo": 100}, "endpoint name"),
             ("good-name", {"demo": str(tiny_model_dir)}, {"demo": 60}, "add up to 100"),
             ("good-name", {"demo": str(tiny_model_dir)}, {"other": 100}, "not defined"),
             ("good-name", {"demo": str(tmp_path / "nowhere")}, {"demo": 100}, "config.json")]
    for name, deployments, traffic, message in cases:
        with pytest.raises(EndpointError, match=message):
            start_endpoint(EndpointSettings(name=name, deployments=deployments, traffic=traffic), state_dir=tmp_path)
    assert list(tmp_path.glob("*.key")) == [] and list(tmp_path.glob("*.settings.json")) == []


def test_delete_from_another_process_finishes_the_request_in_flight_and_leaves_nothing(tiny_model_dir, tmp_path,
                                                                                       capfd):
    state = start_endpoint(EndpointSettings(name="short-lived", deployments={"demo": str(tiny_model_dir)},
                                            traffic={"demo": 100}), state_dir=tmp_path)
    key = read_key(state)
    printed = capfd.readouterr()
    assert key not in printed.out + printed.err
    assert find_endpoint("short-lived", state_dir=tmp_path)["alive"] is True

    # a long streamed request: once its first piece arrived it is certainly in flight when the delete comes
    events, first_piece = [], threading.Event()

    def stream():
        with httpx.stream("POST", state["url"] + "/v1/chat/completions", headers=auth(state), timeout=60,
                          json={"messages": CHAT, "max_tokens": 900, "temperature": 0, "stream": True}) as r:
            events.append(r.status_code)
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) > 3:
                        first_piece.set()
        first_piece.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_piece.wait(30)
    deleted = subprocess.run(
        [sys.executable, "-c", "import json, sys; from runner.local.endpoint.manager import stop_endpoint; "
         "print(json.dumps(stop_endpoint('short-lived', state_dir=sys.argv[1])))", str(tmp_path)],
        capture_output=True, text=True, timeout=60)
    reader.join(30)
    assert deleted.returncode == 0, deleted.stderr
    out = json.loads(deleted.stdout.strip().splitlines()[-1])
    assert out == {**out, "deleted": True, "name": "short-lived", "port": state["port"]}

    assert events[0] == 200
    print(f"in-flight stream during delete: {len(events) - 1} events, last {events[-1][:80]!r}")
    last = events[-1]  # completed ([DONE]) or failed cleanly with a JSON error event: never a torn connection
    assert last == "[DONE]" or "error" in json.loads(last)
    assert not manager._listening("127.0.0.1", state["port"])
    assert not manager._is_our_server(state["pid"], "short-lived")
    assert not Path(state["key_file"]).exists() and not (tmp_path / "short-lived.json").exists()
    assert find_endpoint("short-lived", state_dir=tmp_path) is None
    assert key not in Path(state["log_file"]).read_text()
    assert stop_endpoint("short-lived", state_dir=tmp_path)["deleted"] is True  # idempotent
