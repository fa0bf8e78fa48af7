"""The local endpoint asked for replies to held-out rows (`test.rows=N`), greedy, through both of its routes: the
Azure ML scoring format on /score and the OpenAI chat route (which also says why each reply ended and how many
tokens it took). One request per row, as a client would send them."""

from typing import Any, Dict, List

from runner.local.endpoint.manager import EndpointError, invoke, read_key


def _openai_reply(state: Dict[str, Any], messages, max_new_tokens: int, deployment: str) -> Dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {read_key(state)}", "azureml-model-deployment": deployment}
    body = {"messages": messages, "temperature": 0, "max_tokens": max_new_tokens}
    try:
        r = httpx.post(f"{state['url']}/v1/chat/completions", json=body, headers=headers, timeout=300)
    except httpx.HTTPError as exc:
        raise EndpointError(f"endpoint {state['name']}: the OpenAI route did not answer: {exc}") from None
    if r.status_code != 200:
        raise EndpointError(f"endpoint {state['name']}: the OpenAI route answered {r.status_code}: {r.text[:300]}")
    data = r.json()
    choice = data["choices"][0]
    return {"reply": choice["message"]["content"], "stopped": choice.get("finish_reason") == "stop",
            "reply_tokens": (data.get("usage") or {}).get("completion_tokens")}


def score_rows(state: Dict[str, Any], conversations: List[list], *, max_new_tokens: int,
               deployment: str) -> Dict[str, List[Dict[str, Any]]]:
    """{"score": [{"reply"}], "openai": [{"reply", "stopped", "reply_tokens"}]}, one entry per conversation."""
    out: Dict[str, List[Dict[str, Any]]] = {"score": [], "openai": []}
    for messages in conversations:
        request = {"input_data": {"input_string": [messages],
                                  "parameters": {"do_sample": False, "max_new_tokens": max_new_tokens}}}
        response = invoke(state, request, deployment=deployment, timeout=300)
        out["score"].append({"reply": response.get("output") if isinstance(response, dict) else response})
        out["openai"].append(_openai_reply(state, messages, max_new_tokens, deployment))
    return out
