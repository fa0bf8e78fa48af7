"""deployment.kind=serverless: the fine-tuned model behind a ServerlessEndpoint, called, and deleted.

The endpoint takes the registered model as `model_id` in the workspace form
`azureml://locations/<region>/workspaces/<workspace id>/models/<name>/versions/<version>` (a registry id with a
version is refused by the SDK). It is called at `{scoring_uri}/v1/chat/completions` with its key
(`serverless_endpoints.get_keys`), in the OpenAI chat-completions shape, and deleted with
`serverless_endpoints.begin_delete`.
"""

import json
from typing import Any, Dict, Mapping

from runner.azureml.checks import AzureStepError, check_endpoint_name
from runner.azureml.entities import plain
from runner.azureml.lro import finish

CHAT_PATH = "/v1/chat/completions"
# The notebook's sample parameters under their chat-completions names (do_sample has none: sampling is implied by
# the temperature).
PARAMETER_NAMES = {"max_new_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p"}


def workspace_model_id(*, location: str, workspace_id: str, name: str, version: str) -> str:
    return f"azureml://locations/{location}/workspaces/{workspace_id}/models/{name}/versions/{version}"


def build_serverless_endpoint(*, name: str, model_id: str):
    from azure.ai.ml.entities import ServerlessEndpoint

    return ServerlessEndpoint(name=name, model_id=model_id, auth_mode="key")


def serverless_endpoint_yaml(endpoint: Any) -> Dict[str, Any]:
    """What load_serverless_endpoint reads back: the entity's own fields (its as_dict() fails without system_data,
    which only the service fills in), without the read-only ones."""
    readonly = {"location", "provisioning_state", "scoring_uri", "id", "headers", "system_data"}
    return plain({k: v for k, v in dict(endpoint).items() if k not in readonly and v is not None})


def chat_request(score_request: Mapping[str, Any]) -> Dict[str, Any]:
    """The test step's Azure ML scoring request (input_data.input_string + parameters) as a chat-completions body."""
    data = score_request.get("input_data") or {}
    messages = (data.get("input_string") or [[]])[0]
    body: Dict[str, Any] = {"messages": messages}
    for key, value in (data.get("parameters") or {}).items():
        if key in PARAMETER_NAMES:
            body[PARAMETER_NAMES[key]] = value
    return body


def chat_reply(response: Mapping[str, Any]) -> str:
    try:
        return response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise AzureStepError(f"the serverless endpoint's reply has no choices[0].message.content: "
                             f"{json.dumps(response)[:500]}")


def post_json(url: str, body: Mapping[str, Any], headers: Mapping[str, str], timeout: float) -> Dict[str, Any]:
    """POST a JSON body, the parsed JSON reply; an HTTP error names its status and the start of its body."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        raise AzureStepError(f"POST {url}: HTTP {exc.code} {exc.read()[:300]!r}") from exc


def deploy(backend: Any, ctx: Any) -> Dict[str, Any]:
    from runner.step_results import RegisterResult

    registered = RegisterResult.recorded(ctx.record)
    model_name, version = registered.name, registered.version
    if not model_name or not version:
        raise AzureStepError("no registered model: run the register step, or from_run=<run dir that registered one>")
    name = backend.endpoint_name(ctx)
    check_endpoint_name(name)
    ws = backend.ws(ctx)
    workspace = ws.workspaces.get(ws.workspace_name)  # where the model lives: its region and id
    model_id = workspace_model_id(location=workspace.location, workspace_id=workspace._workspace_id,
                                  name=model_name, version=version)
    endpoint = build_serverless_endpoint(name=name, model_id=model_id)
    ctx.say(f"creating serverless endpoint {name} for {model_name}:{version}")
    result = finish(ws.serverless_endpoints.begin_create_or_update(endpoint), f"creating serverless endpoint {name}",
                    needs=("scoring_uri",))
    return {"endpoint_name": name, "endpoint_kind": "serverless", "model_id": model_id,
            "scoring_uri": result.scoring_uri}


def test(backend: Any, ctx: Any, request_file) -> Dict[str, Any]:
    name = backend.endpoint_in_use(ctx)
    if not name:
        raise AzureStepError("no endpoint to test: run the deploy step, from_run=<run dir>, or endpoint_name=...")
    ws = backend.ws(ctx)
    endpoint = ws.serverless_endpoints.get(name)
    key = ws.serverless_endpoints.get_keys(name).primary_key  # never printed or recorded
    with open(request_file, encoding="utf-8") as f:
        body = chat_request(json.load(f))
    url = f"{str(endpoint.scoring_uri).rstrip('/')}{CHAT_PATH}"
    response = backend.clients.post_json(url, body, {"Authorization": f"Bearer {key}"},
                                         backend.cfg.deployment.request_timeout_ms / 1000)
    print(f"    raw response: {json.dumps(response)[:2000]}", flush=True)
    return {"endpoint_name": name, "url": url, "reply": chat_reply(response),
            "raw_response": json.dumps(response)[:4000]}


def cleanup(backend: Any, ctx: Any, name: str) -> None:
    ctx.say(f"deleting serverless endpoint {name}")
    finish(backend.ws(ctx).serverless_endpoints.begin_delete(name=name), f"deleting serverless endpoint {name}")
