"""Every row of a chat split checked before anything trains on it; problems named by file, line and rule.

Rows in another format (ShareGPT, Alpaca, renamed columns: runner/data/formats.py) are converted to messages first,
so the rules are the same for every format. Rules: valid UTF-8 JSON (an object); the row is in the file's format;
`messages` a non-empty list of {role, content}; roles from {system, user, assistant}; non-empty string content;
user/assistant alternation after an optional leading system message, starting with user; sft splits end with an
assistant turn; no conversation twice in a file (by `prompt_id` when the row has one, else by its content);
`prompt_id` and `prompt`, ultrachat's optional extras, when present: a non-empty string, and the first user
message.

`on_invalid="error"` raises DataValidationError listing the first 20 problems; `"skip"` rewrites the file with the
clean rows (atomically) and writes `<split>.rejects.jsonl` with each rejected line's number, reason and text.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from runner.errors import RunnerError

ROLES = {"system", "user", "assistant"}
MAX_LISTED = 20


class DataValidationError(RunnerError):
    pass


@dataclass
class Problem:
    line: int  # the line number in a JSONL file, the row number (1-based) in a JSON array or Parquet file
    rule: str
    detail: str

    def format(self, path, unit: str = "line") -> str:
        where = f"{path}:{self.line}" if unit == "line" else f"{path} row {self.line}"
        return f"{where}: [{self.rule}] {self.detail}"


@dataclass
class ValidationReport:
    path: str
    split: str
    rows: int = 0
    valid: int = 0
    problems: List[Problem] = field(default_factory=list)
    rejected_lines: int = 0
    rejects_file: Optional[str] = None
    unit: str = "line"
    converted: bool = False  # the rows were converted to messages rows (and the file rewritten so)

    def to_dict(self) -> Dict[str, Any]:
        return {"path": self.path, "split": self.split, "rows": self.rows, "valid": self.valid,
                "rejected": self.rejected_lines, "rejects_file": self.rejects_file,
                "problems": [p.format(self.path, self.unit) for p in self.problems[:MAX_LISTED]],
                "problem_count": len(self.problems), "converted": self.converted}


def check_row(row: Any, *, sft: bool) -> Optional[Tuple[str, str]]:
    """The first rule a messages row breaks, as (rule, detail), or None. Uniqueness is the caller's."""
    if not isinstance(row, dict):
        return "json-object", f"a row must be a JSON object, got {type(row).__name__}"
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages-non-empty-list", "'messages' must be a non-empty list"
    expected = "user"
    first_user = None
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return "message-object", f"messages[{i}] must be an object with role and content"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return "role-allowed", f"messages[{i}].role={role!r}; allowed roles: assistant, system, user"
        if not isinstance(content, str) or not content.strip():
            return "content-non-empty-string", f"messages[{i}].content must be a non-empty string"
        if role == "system":
            if i != 0:
                return "alternation", f"messages[{i}] is a system message; only the first message may be one"
            continue
        if role != expected:
            return "alternation", f"messages[{i}].role={role!r} where {expected!r} was expected (user and " \
                                  f"assistant alternate, starting with user)"
        if role == "user" and first_user is None:
            first_user = content
        expected = "assistant" if role == "user" else "user"
    if first_user is None:
        return "alternation", "no user message"
    if sft and messages[-1].get("role") != "assistant":
        return "sft-ends-with-assistant", "an sft conversation must end with an assistant turn"
    # prompt / prompt_id are ultrachat's extras: optional, but checked when a row has them
    if "prompt_id" in row and (not isinstance(row["prompt_id"], str) or not row["prompt_id"]):
        return "prompt-id-present", "'prompt_id', when given, must be a non-empty string (or be left out: the " \
                                    "conversation's content then identifies the row)"
    if "prompt" in row and row["prompt"] != first_user:
        return "prompt-equals-first-user", "'prompt', when given, must equal the first user message"
    return None


class RowChecker:
    """Parse, convert (runner/data/formats.py) and check the rows of one file in order; remembers the ids seen,
    so a repeated conversation (same prompt_id, or the same content when there is none) is named with the line
    it repeats."""

    def __init__(self, *, sft: bool, fmt: str = "messages", columns=None, unit: str = "line"):
        from runner.data.formats import Converter

        self.sft = sft
        self.unit = unit
        self.converter = Converter(fmt, columns)
        self.seen: Dict[str, int] = {}

    def where(self, number: int) -> str:
        return f"{self.unit} {number}"

    def check(self, number: int, raw: Any) -> Tuple[Optional[Dict[str, Any]], Optional[Problem]]:
        """(the messages row, None) or (None, the problem). `raw` is a line's bytes or an already parsed row."""
        from runner.data.formats import ConversionProblem, row_id

        if isinstance(raw, (bytes, bytearray)):
            try:
                raw = json.loads(raw.decode("utf-8"))  # explicitly: json.loads(bytes) would guess UTF-16/32 too
            except json.JSONDecodeError as exc:
                return None, Problem(number, "valid-json", f"not valid JSON ({exc.msg} at column {exc.colno})")
            except UnicodeDecodeError as exc:
                return None, Problem(number, "valid-json", f"not UTF-8 text (byte {exc.start + 1})")
        if not isinstance(raw, dict):
            return None, Problem(number, "json-object", f"a row must be a JSON object, got {type(raw).__name__}")
        try:
            row = self.converter.convert(raw, self.where(number))
        except ConversionProblem as exc:
            return None, Problem(number, exc.rule, exc.detail)
        broken = check_row(row, sft=self.sft)
        if broken is not None:
            rule, detail = broken
            if self.converter.fmt != "messages":
                detail += f" (after conversion from {self.converter.fmt})"
            return None, Problem(number, rule, detail)
        rid = row_id(row)
        if rid in self.seen:
            if rid.startswith("content:"):
                return None, Problem(number, "duplicate-conversation",
                                     f"the same conversation as {self.where(self.seen[rid])}")
            return None, Problem(number, "prompt-id-unique",
                                 f"prompt_id {rid[:16]}... repeats {self.where(self.seen[rid])}")
        self.seen[rid] = number
        return row, None


def is_sft_split(split: str) -> bool:
    return "sft" in split


class _Discard(Exception):
    """Leaves an atomic_writer without writing its file."""


def _check_mode(on_invalid: str) -> None:
    if on_invalid not in ("error", "skip"):
        raise DataValidationError(f"on_invalid={on_invalid!r}: expected 'error' or 'skip' (dataset.on_invalid)")


def _raise_problems(report: "ValidationReport", label: str) -> None:
    listed = "\n  ".join(p.format(label, report.unit) for p in report.problems[:MAX_LISTED])
    more = len(report.problems) - MAX_LISTED
    raise DataValidationError(
        f"{len(report.problems)} invalid row(s) in {label} ({report.split}); nothing was trained:\n  {listed}"
        + (f"\n  ... and {more} more" if more > 0 else "")
        + "\nFix the data, or set dataset.on_invalid=skip to drop these rows (they go to a rejects file)."
    )


def _line(row: Dict[str, Any]) -> bytes:
    return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


def validate_file(path, split: str, *, on_invalid: str = "error", sft: Optional[bool] = None,
                  fmt: str = "messages", columns=None) -> ValidationReport:
    """Check every line of `path`. See the module docstring for what `on_invalid` does. Rows of another format
    (`fmt`: auto, sharegpt, alpaca; or renamed `columns`) are converted, and the file is rewritten (atomically) as
    messages rows; `report.converted` says so. Problems keep the line numbers of the file as it was."""
    from runner.atomic import atomic_writer
    from runner.data.jsonl import write_jsonl_atomic

    _check_mode(on_invalid)
    sft = is_sft_split(split) if sft is None else sft
    path = Path(path)
    report = ValidationReport(path=str(path), split=split)
    checker = RowChecker(sft=sft, fmt=fmt, columns=columns)
    rejects: List[Dict[str, Any]] = []

    def scan(out=None) -> None:
        # Binary lines: numbered exactly as `wc -l` and editors count them (text mode would also split on a stray
        # carriage return), and a line that is not UTF-8 is one invalid row rather than a crash of the whole scan.
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                report.rows += 1
                row, problem = checker.check(number, line)
                if problem is None:
                    report.valid += 1
                    if out is not None:
                        out.write(_line(row))
                    continue
                report.problems.append(problem)
                if on_invalid == "skip":
                    rejects.append({"line": number, "rule": problem.rule, "reason": problem.detail,
                                    "text": line.decode("utf-8", "replace").rstrip("\r\n")})

    if fmt == "messages" and not columns:
        scan()
    else:  # the converted rows are written as they are checked; kept only if something was converted
        try:
            with atomic_writer(path, "wb", fsync=True) as out:
                scan(out)
                if not checker.converter.changed or (report.problems and on_invalid == "error"):
                    raise _Discard()
            report.converted = True
        except _Discard:
            pass
    if not report.problems:
        return report
    if on_invalid == "error":
        _raise_problems(report, str(path))
    if not report.converted:
        # skip: the clean rows replace the file, the rejected ones are kept beside it with their reasons. A second
        # raw pass (no parsing) instead of holding every clean line in memory: it runs only when something was
        # rejected.
        rejected = {r["line"] for r in rejects}
        with open(path, "rb") as src, atomic_writer(path, "wb", fsync=True) as f:
            for number, line in enumerate(src, 1):
                if number not in rejected and line.strip():
                    f.write(line if line.endswith(b"\n") else line + b"\n")
    rejects_path = path.with_name(f"{split}.rejects.jsonl")
    write_jsonl_atomic(rejects_path, rejects)
    report.rejected_lines = len(rejects)
    report.rejects_file = str(rejects_path)
    print(f"    {split}: dropped {len(rejects)} invalid row(s) of {report.rows}; see {rejects_path}", flush=True)
    return report


def validate_rows(label: str, items: Iterable[Tuple[int, Any]], *, split: str, unit: str = "line",
                  on_invalid: str = "error", sft: bool = True, fmt: str = "auto", columns=None,
                  rejects_path=None) -> Tuple[List[Dict[str, Any]], ValidationReport]:
    """Check the rows of a user's file (runner/data/sources.py gives them with their line or row numbers) and
    return the clean ones as messages rows, in order. Problems name `label` and the number; skip mode writes the
    rejected rows, with their reasons, to `rejects_path`."""
    from runner.data.jsonl import write_jsonl_atomic

    _check_mode(on_invalid)
    report = ValidationReport(path=label, split=split, unit=unit)
    checker = RowChecker(sft=sft, fmt=fmt, columns=columns, unit=unit)
    clean: List[Dict[str, Any]] = []
    rejects: List[Dict[str, Any]] = []
    for number, raw in items:
        report.rows += 1
        row, problem = checker.check(number, raw)
        if problem is None:
            report.valid += 1
            clean.append(row)
            continue
        report.problems.append(problem)
        text = raw.decode("utf-8", "replace").rstrip("\r\n") if isinstance(raw, (bytes, bytearray)) else \
            json.dumps(raw, ensure_ascii=False, default=str)
        rejects.append({unit: number, "rule": problem.rule, "reason": problem.detail, "text": text})
    report.converted = checker.converter.changed
    if report.problems and on_invalid == "error":
        _raise_problems(report, label)
    if report.problems:
        write_jsonl_atomic(rejects_path, rejects)
        report.rejected_lines = len(rejects)
        report.rejects_file = str(rejects_path)
        print(f"    {label}: dropped {len(rejects)} invalid row(s) of {report.rows}; see {rejects_path}", flush=True)
    return clean, report
