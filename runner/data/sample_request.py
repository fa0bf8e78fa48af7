"""The endpoint's sample request: one seeded random row of the sample split, in the notebook's scoring format

    {"input_data": {"input_string": [messages], "parameters": {...}}, "params": {}}

`input_string` holds one conversation. A conversation that ends with an assistant turn loses that turn, so the
endpoint is asked to write it.
"""

import json
import random
from typing import Any, Dict

from runner.data.jsonl import iter_jsonl
from runner.errors import RunnerError


def pick_row(path, seed: int) -> Dict[str, Any]:
    lines = [line for _, line in iter_jsonl(path)]
    if not lines:
        raise RunnerError(f"{path} has no rows to draw a sample request from (dataset.sample_split)")
    return json.loads(random.Random(seed).choice(lines))


def build_sample_request(sample_file, seed: int, parameters: Dict[str, Any]) -> Dict[str, Any]:
    messages = [{"role": m["role"], "content": m["content"]} for m in pick_row(sample_file, seed)["messages"]]
    if len(messages) > 1 and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return {"input_data": {"input_string": [messages], "parameters": dict(parameters)}, "params": {}}

