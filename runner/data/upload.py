"""The file a remote trainer is given: messages rows only, the format of the Azure chat_completion components.

A split whose rows hold nothing but `messages` (and ultrachat's `prompt`/`prompt_id`, which the notebook has always
uploaded) is used as it is; otherwise a copy with only `messages` in every row is written (atomically) and used.
"""

import json
from pathlib import Path

from runner.data.jsonl import iter_jsonl, write_jsonl_atomic

UPLOADED_KEYS = {"messages", "prompt", "prompt_id"}


def needs_copy(path) -> bool:
    for _, line in iter_jsonl(path):
        row = json.loads(line)
        if not isinstance(row, dict) or "messages" not in row or set(row) - UPLOADED_KEYS:
            return True
    return False


def messages_only(path, copy_path) -> Path:
    """`path` when its rows are already messages rows, else `copy_path` holding {"messages": ...} of each row."""
    path = Path(path)
    if not needs_copy(path):
        return path
    write_jsonl_atomic(copy_path, ({"messages": json.loads(line)["messages"]} for _, line in iter_jsonl(path)))
    return Path(copy_path)
