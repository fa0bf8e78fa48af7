"""Every row of a chat split checked before anything trains on it; problems named by file, line and rule.

Rules: valid JSON (an object); `messages` a non-empty list of {role, content}; roles from {system, user, assistant};
non-empty string content; user/assistant alternation after an optional leading system message, starting with
user; sft splits end with an assistant turn; `prompt_id` present, a non-empty string, unique in the file; `prompt`
equals the first user message.

`on_invalid="error"` raises DataValidationError listing the first 20 problems; `"skip"` rewrites the file with the
clean rows (atomically) and writes `<split>.rejects.jsonl` with each rejected line's number, reason and text.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from runner.errors import RunnerError

ROLES = {"system", "user", "assistant"}
MAX_LISTED = 20


class DataValidationError(RunnerError):
    pass


@dataclass
class Problem:
    line: int
    rule: str
    detail: str

    def format(self, path) -> str:
        return f"{path}:{self.line}: [{self.rule}] {self.detail}"


@dataclass
class ValidationReport:
    path: str
    split: str
    rows: int = 0
    valid: int = 0
    problems: List[Problem] = field(default_factory=list)
    rejected_lines: int = 0
    rejects_file: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return {"path": self.path, "split": self.split, "rows": self.rows, "valid": self.valid,
                "rejected": self.rejected_lines, "rejects_file": self.rejects_file,
                "problems": [p.format(self.path) for p in self.problems[:MAX_LISTED]],
                "problem_count": len(self.problems)}


def check_row(row: Any, *, sft: bool) -> Optional[Tuple[str, str]]:
    """The first rule a parsed row breaks, as (rule, detail), or None. prompt_id uniqueness is the caller's."""
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
    prompt_id = row.get("prompt_id")
    if not isinstance(prompt_id, str) or not prompt_id:
        return "prompt-id-present", "'prompt_id' must be a non-empty string"
    if row.get("prompt") != first_user:
        return "prompt-equals-first-user", "'prompt' must equal the first user message"
    return None


def is_sft_split(split: str) -> bool:
    return "sft" in split


def validate_file(path, split: str, *, on_invalid: str = "error", sft: Optional[bool] = None) -> ValidationReport:
    """Check every line of `path`. See the module docstring for what `on_invalid` does."""
    from runner.atomic import atomic_writer
    from runner.data.jsonl import write_jsonl_atomic

    if on_invalid not in ("error", "skip"):
        raise DataValidationError(f"on_invalid={on_invalid!r}: expected 'error' or 'skip' (dataset.on_invalid)")
    sft = is_sft_split(split) if sft is None else sft
    path = Path(path)
    report = ValidationReport(path=str(path), split=split)
    seen_ids: Dict[str, int] = {}
    rejects: List[Dict[str, Any]] = []
    loads = json.loads
    # Binary lines: numbered exactly as `wc -l` and editors count them (text mode would also split on a stray
    # carriage return), and a line that is not UTF-8 is one invalid row rather than a crash of the whole scan.
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            report.rows += 1
            try:
                row = loads(line.decode("utf-8"))  # explicitly: json.loads(bytes) would guess UTF-16/32 too
            except json.JSONDecodeError as exc:
                problem = Problem(number, "valid-json", f"not valid JSON ({exc.msg} at column {exc.colno})")
            except UnicodeDecodeError as exc:
                problem = Problem(number, "valid-json", f"not UTF-8 text (byte {exc.start + 1})")
            else:
                broken = check_row(row, sft=sft)
                if broken is None:
                    pid = row["prompt_id"]
                    if pid in seen_ids:
                        broken = ("prompt-id-unique", f"prompt_id {pid[:16]}... repeats line {seen_ids[pid]}")
                    else:
                        seen_ids[pid] = number
                problem = Problem(number, *broken) if broken else None
            if problem is None:
                report.valid += 1
                continue
            report.problems.append(problem)
            if on_invalid == "skip":
                rejects.append({"line": number, "rule": problem.rule, "reason": problem.detail,
                                "text": line.decode("utf-8", "replace").rstrip("\r\n")})
    if not report.problems:
        return report
    if on_invalid == "error":
        listed = "\n  ".join(p.format(path) for p in report.problems[:MAX_LISTED])
        more = len(report.problems) - MAX_LISTED
        raise DataValidationError(
            f"{len(report.problems)} invalid row(s) in {path} ({split}); nothing was trained:\n  {listed}"
            + (f"\n  ... and {more} more" if more > 0 else "")
            + "\nFix the data, or set dataset.on_invalid=skip to drop these rows (they go to a rejects file)."
        )
    # skip: the clean rows replace the file, the rejected ones are kept beside it with their reasons. A second raw
    # pass (no parsing) instead of holding every clean line in memory: it runs only when something was rejected.
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
