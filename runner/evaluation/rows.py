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
from typing import Iterator, List, Optional, Tuple

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


def _read(path: Path) -> Iterator[Tuple[int, List[dict]]]:
    """(line or row number, messages) of every row: JSONL, a JSON array or Parquet, in any format dataset=local
    reads (messages, ShareGPT, Alpaca; decided by the first row), converted as the data step converts them."""
    from runner.data.formats import ConversionProblem, Converter
    from runner.data.sources import read_rows

    unit, items = read_rows(path)
    converter = Converter("auto")
    for number, item in items:
        if isinstance(item, bytes):  # a JSONL line
            try:
                item = json.loads(item.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise EvaluationDataError(f"{path}:{number}: not valid JSON ({exc})") from None
        if not isinstance(item, dict):
            raise EvaluationDataError(f"{path}:{number}: a row must be a JSON object, not {type(item).__name__}")
        try:
            row = converter.convert(item, f"{unit} {number}")
        except ConversionProblem as exc:
            raise EvaluationDataError(f"{path}:{number}: {exc.detail}") from None
        yield number, _messages(row, path, number)


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
    for number, messages in _read(path):
        split = split_conversation(messages)
        if split is None:
            missing.append(number)
            continue
        rows.append(EvalRow(index=len(rows) + len(missing), prompt=split[0], reference=split[1],
                            source=f"{path.name}:{number}"))
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


def rows_file_for(data_outputs: Optional[dict], evaluate_file: Optional[str]) -> Tuple[str, Optional[str]]:
    """(the file to score, the training file it must not be) from the data step's outputs (`test_file`: the
    held-out split, `train_file`) and `evaluate.file` (a golden set, which wins when given)."""
    data_outputs = data_outputs or {}
    train_file = data_outputs.get("train_file")
    if evaluate_file:
        return str(evaluate_file), train_file
    test_file = data_outputs.get("test_file")
    if not test_file:
        raise EvaluationDataError("no held-out split to evaluate on: run the data step (or pick an earlier run with "
                                  "from_run=), or name a file with evaluate.file=PATH")
    if train_file and (test_file == train_file or _same_file(test_file, train_file)):
        raise EvaluationDataError(f"the held-out split {test_file} is the training split (dataset.test_split equals "
                                  f"dataset.train_split): evaluating on training rows says nothing; give "
                                  f"evaluate.file=PATH or a separate test split")
    return str(test_file), train_file
