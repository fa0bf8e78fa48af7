"""`test.rows=N` on Azure: the deployed endpoint's replies to held-out rows, greedy, one request per row.

A managed online endpoint serves the scoring route (`online_endpoints.invoke` with an Azure ML scoring request, as
the test step's sample request); a serverless endpoint serves the chat-completions route (with its key), which also
says why each reply ended and how many tokens it took. The OpenAI route of the local endpoint has no counterpart on
a managed online endpoint serving an MLflow model, so only its `score` route is reported there.
"""

import json
from typing import Any, Dict, List

from runner.atomic import write_text


def _score_route(backend: Any, ctx: Any, conversations: List[list], max_new_tokens: int) -> List[Dict[str, Any]]:
    from runner.azureml.checks import AzureStepError
    from runner.azureml.scoring import extract_reply

    name = backend.endpoint_in_use(ctx)
    if not name:
        raise AzureStepError("no endpoint to score: run the deploy step, from_run=<run dir>, or endpoint_name=...")
    from runner.step_results import DeployResult

    deployment = DeployResult.recorded(ctx.record).deployment_name or backend.cfg.deployment.deployment_name
    replies = []
    for i, messages in enumerate(conversations):
        request = ctx.run_dir / "test_rows" / f"request_{i}.json"
        write_text(request, json.dumps({"input_data": {"input_string": [messages], "parameters": {
            "do_sample": False, "max_new_tokens": max_new_tokens}}, "params": {}}))
        raw = backend.ws(ctx).online_endpoints.invoke(endpoint_name=name, deployment_name=deployment,
                                                       request_file=str(request))
        replies.append({"reply": extract_reply(raw)})
    return replies


def _chat_route(backend: Any, ctx: Any, conversations: List[list], max_new_tokens: int) -> List[Dict[str, Any]]:
    from runner.azureml.serverless import CHAT_PATH, chat_reply

    name = backend.endpoint_in_use(ctx)
    ws = backend.ws(ctx)
    url = f"{str(ws.serverless_endpoints.get(name).scoring_uri).rstrip('/')}{CHAT_PATH}"
    key = ws.serverless_endpoints.get_keys(name).primary_key  # never printed or recorded
    replies = []
    for messages in conversations:
        response = backend.clients.post_json(url, {"messages": messages, "temperature": 0,
                                                   "max_tokens": max_new_tokens},
                                             {"Authorization": f"Bearer {key}"},
                                             backend.cfg.deployment.request_timeout_ms / 1000)
        choice = (response.get("choices") or [{}])[0]
        replies.append({"reply": chat_reply(response), "stopped": choice.get("finish_reason") == "stop",
                        "reply_tokens": (response.get("usage") or {}).get("completion_tokens")})
    return replies


def score_rows(backend: Any, ctx: Any, conversations: List[list], max_new_tokens: int) -> Dict[str, Any]:
    if backend.cfg.deployment.kind == "serverless":
        return {"openai": _chat_route(backend, ctx, conversations, max_new_tokens)}
    return {"score": _score_route(backend, ctx, conversations, max_new_tokens)}
