"""The rows an evaluation scores: read a `messages` JSONL file (the data step's held-out split, or a user's golden
set), take each conversation's last assistant turn as the reference and everything before it as the prompt, and
choose `max_rows` of them by the seed (all rows when there are fewer).

Checked before any model is loaded: the file exists and is not the training file, every row is a messages row with
an assistant turn, max_rows is at least 1. (Rows too long for the model's context are checked by the evaluator,
which has the tokenizer.)
"""

import json
import os
import random
from pathlib import Path
from typing import List, Optional

from runner.errors import RunnerError
from runner.evaluation.results import EvalRow

_SHOWN = 5  # offending rows named in an error


class EvaluationDataError(RunnerError):
    """The evaluation's rows cannot be scored as given."""


def _messages(row, path, lineno) -> List[dict]:
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise EvaluationDataError(f"{path}:{lineno}: not a messages row: 'messages' must be a non-empty list of "
                                  f"{{'role': str, 'content': str}} (other formats are converted by the data step; "
                                  f"dataset=local reads them)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def split_conversation(messages: List[dict]) -> Optional[tuple]:
    """(prompt, reference) for one conversation: the last assistant turn is the reference, the turns before it the
    prompt (turns after it, e.g. a trailing user question with no answer, are not part of the task). None when the
    conversation has no assistant turn, or nothing before it."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if not last:  # None (no assistant turn) or 0 (an answer to nothing)
        return None
    return messages[:last], messages[last]["content"]


def _same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def load_rows(path, *, max_rows: Optional[int], seed: int, train_file=None) -> List[EvalRow]:
    """All rows of `path` as EvalRows, or `max_rows` of them chosen by `seed` (kept in file order)."""
    path = Path(path)
    if max_rows is not None and max_rows < 1:
        raise EvaluationDataError(f"evaluate.max_rows={max_rows}: at least 1 row is needed (null: all rows)")
    if not path.is_file():
        raise EvaluationDataError(f"evaluation file not found: {path}")
    if train_file is not None and _same_file(path, train_file):
        raise EvaluationDataError(f"{path} is the training file: evaluating on rows the model was trained on says "
                                  f"nothing about held-out chats; use the held-out split or another file")
    rows, missing = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvaluationDataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            split = split_conversation(_messages(record, path, lineno))
            if split is None:
                missing.append(lineno)
                continue
            rows.append(EvalRow(index=len(rows) + len(missing), prompt=split[0], reference=split[1],
                                source=f"{path.name}:{lineno}"))
    if missing:
        shown = ", ".join(str(n) for n in missing[:_SHOWN]) + (" ..." if len(missing) > _SHOWN else "")
        raise EvaluationDataError(
            f"{path}: {len(missing)} of {len(missing) + len(rows)} rows have no assistant turn after a prompt "
            f"(line {shown}); every evaluation row needs one: its last assistant turn is the reference answer")
    if not rows:
        raise EvaluationDataError(f"{path} holds no rows")
    if max_rows is None or len(rows) <= max_rows:
        return rows
    chosen = sorted(random.Random(seed).sample(range(len(rows)), max_rows))
    return [rows[i] for i in chosen]
