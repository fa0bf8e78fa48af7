"""Choosing and checking the evaluation's rows, before any model is loaded."""

import json

import pytest

from runner.errors import RunnerError
from runner.evaluation.rows import EvaluationDataError, load_rows, split_conversation


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _chat(i, turns=1):
    messages = [{"role": "system", "content": "be brief"}]
    for t in range(turns):
        messages += [{"role": "user", "content": f"q{i}.{t}"}, {"role": "assistant", "content": f"a{i}.{t}"}]
    return {"messages": messages, "prompt": f"q{i}.0"}


def test_reference_is_the_last_assistant_turn_and_prompt_what_came_before():
    messages = _chat(0, turns=2)["messages"] + [{"role": "user", "content": "unanswered"}]
    prompt, reference = split_conversation(messages)
    assert reference == "a0.1"
    assert [m["content"] for m in prompt] == ["be brief", "q0.0", "a0.0", "q0.1"]
    assert split_conversation([{"role": "user", "content": "x"}]) is None
    assert split_conversation([{"role": "assistant", "content": "hello"}]) is None  # an answer to nothing


def test_max_rows_chosen_by_the_seed_in_file_order(tmp_path):
    path = _write(tmp_path / "eval.jsonl", [_chat(i) for i in range(50)])
    a = load_rows(path, max_rows=10, seed=1)
    assert [r.index for r in a] == sorted(r.index for r in a) and len(a) == 10
    assert [r.index for r in load_rows(path, max_rows=10, seed=1)] == [r.index for r in a]
    assert [r.index for r in load_rows(path, max_rows=10, seed=2)] != [r.index for r in a]
    assert a[0].reference == f"a{a[0].index}.0" and a[0].source == f"eval.jsonl:{a[0].index + 1}"
    assert len(load_rows(path, max_rows=500, seed=1)) == 50  # fewer rows than asked: all of them
    assert len(load_rows(path, max_rows=None, seed=1)) == 50


def test_max_rows_zero_is_refused(tmp_path):
    path = _write(tmp_path / "eval.jsonl", [_chat(0)])
    with pytest.raises(EvaluationDataError, match=r"evaluate.max_rows=0: at least 1 row"):
        load_rows(path, max_rows=0, seed=0)


def test_a_file_without_assistant_turns_is_refused_naming_lines(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"question {i}"}]} for i in range(3)]
    path = _write(tmp_path / "golden.jsonl", rows)
    with pytest.raises(EvaluationDataError, match=r"3 of 3 rows have no assistant turn after a prompt \(line 1, 2, 3\)"):
        load_rows(path, max_rows=None, seed=0)
    assert issubclass(EvaluationDataError, RunnerError)  # printed as a message by ftrun, no traceback


def test_not_messages_rows_and_missing_files_are_clear_errors(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [{"text": "hello"}])
    with pytest.raises(EvaluationDataError, match=r"bad.jsonl:1: no 'messages', 'conversations' or 'instruction'"):
        load_rows(path, max_rows=None, seed=0)
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(EvaluationDataError, match=r"broken.jsonl:1: not valid JSON"):
        load_rows(tmp_path / "broken.jsonl", max_rows=None, seed=0)
    with pytest.raises(EvaluationDataError, match="not found"):
        load_rows(tmp_path / "nope.jsonl", max_rows=None, seed=0)


def test_the_training_file_is_refused(tmp_path):
    path = _write(tmp_path / "train.jsonl", [_chat(0)])
    with pytest.raises(EvaluationDataError, match="is the training file"):
        load_rows(path, max_rows=None, seed=0, train_file=str(path))


def test_unknown_metric_fails_before_any_file_or_model_is_touched(tmp_path):
    from runner.local.evaluator import EvaluatorSettings, evaluate

    with pytest.raises(RunnerError, match=r"unknown metric\(s\) 'blue' \(did you mean 'bleu'\?\)"):
        evaluate(base_dir=tmp_path / "no-model", ft_dir=tmp_path / "no-model", rows_file=tmp_path / "no-file",
                 settings=EvaluatorSettings(metrics=["loss", "blue"]))


def test_other_formats_dataset_local_reads_are_converted(tmp_path):
    sharegpt = _write(tmp_path / "golden.jsonl", [{"conversations": [
        {"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "4"}]}])
    rows = load_rows(sharegpt, max_rows=None, seed=0)
    assert rows[0].reference == "4" and rows[0].prompt == [{"role": "user", "content": "What is 2+2?"}]
    alpaca = tmp_path / "golden.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}]))
    rows = load_rows(alpaca, max_rows=None, seed=0)
    assert rows[0].reference == "hi" and rows[0].source == "golden.json:1"


def test_the_held_out_split_is_the_default_and_a_golden_file_wins(tmp_path):
    from runner.evaluation.rows import rows_file_for

    data = {"train_file": str(tmp_path / "train_sft.jsonl"), "test_file": str(tmp_path / "test_sft.jsonl")}
    assert rows_file_for(data, None) == (data["test_file"], data["train_file"])
    assert rows_file_for(data, "golden.jsonl") == ("golden.jsonl", data["train_file"])
    with pytest.raises(EvaluationDataError, match="is the training split"):
        rows_file_for({"train_file": "a.jsonl", "test_file": "a.jsonl"}, None)
    with pytest.raises(EvaluationDataError, match="no held-out split"):
        rows_file_for({}, None)
