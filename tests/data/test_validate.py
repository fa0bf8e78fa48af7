"""Validation details beyond one broken rule per line (tests/data/test_data.py has those): line numbering on odd files,
non-UTF-8 bytes, skip mode on a file without a final newline, message-level rules, the report's shape."""

import json

import pytest

from runner.data.validate import DataValidationError, check_row, validate_file


def row(i):
    return {"prompt": f"Q{i}?", "prompt_id": f"{i:064x}",
            "messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]}


def test_windows_line_endings_and_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "train_sft.jsonl"
    lines = [json.dumps(row(0)), "", json.dumps(row(1)), json.dumps({**row(2), "prompt_id": ""})]
    path.write_bytes("\r\n".join(lines).encode() + b"\r\n")
    with pytest.raises(DataValidationError, match=rf"{path}:4: \[prompt-id-present\]"):
        validate_file(path, "train_sft")


def test_a_line_that_is_not_utf8_is_one_invalid_row(tmp_path):
    path = tmp_path / "train_sft.jsonl"
    path.write_bytes(json.dumps(row(0)).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n' + json.dumps(row(2)).encode())
    report = validate_file(path, "train_sft", on_invalid="skip")
    assert (report.rows, report.valid, report.rejected_lines) == (3, 2, 1)
    assert report.problems[0].line == 2 and report.problems[0].rule == "valid-json"
    assert "not UTF-8" in report.problems[0].detail
    assert path.read_text().splitlines() == [json.dumps(row(0)), json.dumps(row(2))]  # final newline added
    reject = json.loads((tmp_path / "train_sft.rejects.jsonl").read_text())
    assert reject["line"] == 2 and reject["text"] == '{"prompt": "caf\ufffd"}'


def test_a_clean_file_is_not_rewritten_in_skip_mode(tmp_path):
    path = tmp_path / "test_sft.jsonl"
    path.write_text(json.dumps(row(0)) + "\n")
    before = path.stat().st_mtime_ns
    report = validate_file(path, "test_sft", on_invalid="skip")
    assert report.rejected_lines == 0 and report.rejects_file is None
    assert path.stat().st_mtime_ns == before and not (tmp_path / "test_sft.rejects.jsonl").exists()


@pytest.mark.parametrize("messages, rule", [
    ([{"role": "user", "content": "a"}, "not an object"], "message-object"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}], "content-non-empty-string"),
    ([{"role": "assistant", "content": "a"}], "alternation"),  # must start with the user
    ([{"role": "system", "content": "s"}], "alternation"),  # no user message at all
    ([{"content": "a"}], "role-allowed"),
])
def test_message_level_rules(messages, rule):
    assert check_row({"prompt": "a", "prompt_id": "p", "messages": messages}, sft=False)[0] == rule


def test_prompt_and_prompt_id_are_optional_but_checked_when_present():
    system_first = {**row(0), "messages": [{"role": "system", "content": "Be brief."}, *row(0)["messages"]]}
    assert check_row(system_first, sft=True) is None
    assert check_row({"messages": row(0)["messages"]}, sft=True) is None  # the OpenAI format: messages only
    assert check_row({**row(0), "prompt_id": 7}, sft=True)[0] == "prompt-id-present"
    assert check_row({**row(0), "prompt": "other"}, sft=True)[0] == "prompt-equals-first-user"


def test_the_report_is_json_ready(tmp_path):
    path = tmp_path / "train_gen.jsonl"
    path.write_text("\n".join([json.dumps(row(0)), "[]", json.dumps(row(0))]) + "\n")
    report = validate_file(path, "train_gen", on_invalid="skip").to_dict()
    assert json.loads(json.dumps(report)) == report
    assert report["rows"] == 3 and report["valid"] == 1 and report["rejected"] == 2 and report["problem_count"] == 2
    assert report["problems"] == [f"{path}:2: [json-object] a row must be a JSON object, got list",
                                  f"{path}:3: [prompt-id-unique] prompt_id {'0' * 16}... repeats line 1"]


def test_an_unknown_on_invalid_mode_is_refused(tmp_path):
    path = tmp_path / "train_sft.jsonl"
    path.write_text(json.dumps(row(0)) + "\n")
    with pytest.raises(DataValidationError, match="expected 'error' or 'skip'"):
        validate_file(path, "train_sft", on_invalid="ignore")
