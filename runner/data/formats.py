"""Chat rows in the formats users already have, turned into `messages` rows, the format of the OpenAI fine-tuning
API and of the Azure chat_completion components:

    messages  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
              (prompt / prompt_id, as ultrachat_200k has them, are optional extras and are kept)
    sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...], "system": "..."?}
              (as Axolotl and LLaMA-Factory read it; a top-level `system` becomes the leading system message)
    alpaca    {"instruction": "...", "input": "..."?, "output": "...", "system": "..."?, "history": [[q, a], ...]?}
              (the user turn is the instruction, then a blank line and the input when there is one)

`dataset.format=auto` takes the format of the first row that has one; a later row of another format is an error
naming its line. `dataset.columns` maps the field names above to a source's own (columns.messages=conversation).
Conversion only renames and reshapes: whether the conversation is well formed (roles, alternation, empty content,
last turn) is checked afterwards, on the messages, the same way for every format (runner/data/validate.py).
"""

import hashlib
import json
from typing import Any, Dict, Mapping, Optional

FORMATS = ("messages", "sharegpt", "alpaca")
KEY_FIELDS = {"messages": "messages", "sharegpt": "conversations", "alpaca": "instruction"}
FIELDS = ("messages", "conversations", "instruction", "input", "output", "system", "history", "prompt", "prompt_id")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


class ConversionProblem(Exception):
    """A row that cannot be read as the file's format: (rule, detail) as validation reports them."""

    def __init__(self, rule: str, detail: str):
        super().__init__(detail)
        self.rule, self.detail = rule, detail


def column_map(columns: Any) -> Dict[str, str]:
    """dataset.columns (a config node or a dict) as {our field: the source's column}, unset fields left out."""
    if not columns:
        return {}
    items = columns.items() if hasattr(columns, "items") else vars(columns).items()
    return {str(k): str(v) for k, v in items if v}


def apply_columns(row: Dict[str, Any], columns: Optional[Mapping[str, str]]) -> Dict[str, Any]:
    """The row with the source's column names mapped to ours (columns: our field -> the source's column)."""
    if not columns:
        return row
    out = dict(row)
    for ours, theirs in columns.items():
        if theirs in row and ours != theirs:
            out[ours] = out.pop(theirs)
    return out


def detect(row: Dict[str, Any]) -> Optional[str]:
    """The format a row is in, from its key field, or None."""
    for fmt, key in KEY_FIELDS.items():
        if key in row:
            return fmt
    return None


def _sharegpt(row: Dict[str, Any]) -> Dict[str, Any]:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ConversionProblem("sharegpt-conversations", "'conversations' must be a non-empty list of "
                                                          "{'from': 'human'|'gpt'|'system', 'value': str}")
    messages = []
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise ConversionProblem("sharegpt-conversations", f"conversations[{i}] must be an object with 'from' "
                                                              f"and 'value'")
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise ConversionProblem("sharegpt-from", f"conversations[{i}].from={turn.get('from')!r}; expected "
                                                     f"human, gpt or system")
        messages.append({"role": role, "content": turn.get("value")})
    return {"messages": messages}


def _text(row: Dict[str, Any], key: str, required: bool) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise ConversionProblem("alpaca-fields", f"'{key}' must be a{' non-empty' if required else ''} string, "
                                                 f"got {json.dumps(value, ensure_ascii=False)[:40]}")
    return value


def _alpaca(row: Dict[str, Any]) -> Dict[str, Any]:
    instruction, output = _text(row, "instruction", True), _text(row, "output", True)
    extra, system = _text(row, "input", False), _text(row, "system", False)
    messages = [{"role": "system", "content": system}] if system.strip() else []
    history = row.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
        raise ConversionProblem("alpaca-fields", "'history' must be a list of [user, assistant] pairs")
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return {"messages": messages}


def to_messages(row: Dict[str, Any], fmt: str) -> Dict[str, Any]:
    """One row of format `fmt` (already column-mapped) as a messages row; raises ConversionProblem.
    A messages row is returned as it is (its extras kept); the others become {"messages": [...]}."""
    have = detect(row)
    if have != fmt:
        found = f"has '{KEY_FIELDS[have]}' ({have} format)" if have else \
            f"has none of {', '.join(repr(k) for k in KEY_FIELDS.values())} (keys: {', '.join(sorted(row))[:80]})"
        raise ConversionProblem("format", f"a {fmt} row needs '{KEY_FIELDS[fmt]}' but this one {found}")
    if fmt == "messages":
        return row
    return _sharegpt(row) if fmt == "sharegpt" else _alpaca(row)


class Converter:
    """Rows of one file to messages rows. With fmt="auto" the first row that has a format decides it, and
    `decided_at` remembers where, so a row of another format can say which line set the file's format."""

    def __init__(self, fmt: str = "messages", columns: Optional[Mapping[str, str]] = None):
        if fmt not in ("auto",) + FORMATS:
            raise ValueError(f"format {fmt!r}: expected auto, {', '.join(FORMATS)} (dataset.format)")
        self.fmt = None if fmt == "auto" else fmt
        self.auto = fmt == "auto"
        self.columns = column_map(columns)
        self.decided_at: Optional[str] = None
        self.changed = False  # True once a row was reshaped or renamed (the file on disk is not messages rows)

    def convert(self, row: Dict[str, Any], where: str) -> Dict[str, Any]:
        mapped = apply_columns(row, self.columns)
        if mapped is not row:
            self.changed = True
        if self.fmt is None:  # auto, not decided yet
            found = detect(mapped)
            if found is None:
                raise ConversionProblem("format", f"no 'messages', 'conversations' or 'instruction' field (keys: "
                                                  f"{', '.join(sorted(mapped))[:80]}); the formats are messages, "
                                                  f"sharegpt and alpaca (dataset.format, dataset.columns)")
            self.fmt, self.decided_at = found, where
        elif self.auto:
            found = detect(mapped)
            if found != self.fmt:
                what = f"a {found} row" if found else "a row of no known format"
                raise ConversionProblem("format-mixed", f"{what} in a {self.fmt} file (format decided by "
                                                        f"{self.decided_at}); one format per file")
        out = to_messages(mapped, self.fmt)
        if self.fmt != "messages":
            self.changed = True
        return out


def row_id(row: Dict[str, Any]) -> str:
    """A row's identity for the duplicate check: its prompt_id when it has one, else a digest of the
    conversation's roles and contents (so the same conversation twice is found whatever its format was)."""
    prompt_id = row.get("prompt_id")
    if isinstance(prompt_id, str) and prompt_id:
        return prompt_id
    canonical = json.dumps([[m.get("role"), m.get("content")] for m in row["messages"]], ensure_ascii=False)
    return "content:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()
