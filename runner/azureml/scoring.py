"""The reply text in a managed online endpoint's response, whichever shape the scoring script returned.

Shapes seen in practice: `{"output": "..."}`, `[{"0": "..."}]`, `{"0": "..."}`, a plain string (possibly itself
JSON-encoded, as `online_endpoints.invoke` returns the body as text).
"""

import json
from typing import Any


class UnexpectedResponse(ValueError):
    pass


def extract_reply(raw: Any) -> str:
    value = raw
    for _ in range(3):  # invoke() returns text; a scoring script may also JSON-encode its string twice
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8")
        if isinstance(value, str):
            text = value.strip()
            if text[:1] in ("{", "[", '"'):
                try:
                    value = json.loads(text)
                    continue
                except ValueError:
                    pass
            return value
        break
    if isinstance(value, list):
        if not value:
            raise UnexpectedResponse("the endpoint returned an empty list")
        value = value[0]
    if isinstance(value, dict):
        for key in ("output", "0", 0):
            if key in value:
                reply = value[key]
                return reply if isinstance(reply, str) else json.dumps(reply)
        raise UnexpectedResponse(f"no 'output' or '0' key in the endpoint's response: {json.dumps(value)[:300]}")
    if isinstance(value, str):
        return value
    raise UnexpectedResponse(f"unexpected response type {type(value).__name__}: {str(value)[:300]}")
