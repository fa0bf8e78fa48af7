"""Your own data: messages/ShareGPT/Alpaca rows, JSONL/JSON/Parquet files, derived ids, the held-out eval split,
the mixed-format error with its line, dataset.columns, the dataset slug, and the data step on dataset=local."""

import json
import os

import pytest

from runner.data.download import DatasetRequestError, download_splits
from runner.data.formats import Converter, ConversionProblem, row_id
from runner.data.local import hold_out
from runner.data.names import dataset_slug, model_name
from runner.data.step import run_data_step
from runner.data.validate import DataValidationError, validate_file
from tests.conftest import compose_cfg

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 2?"},
                {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And 3 plus 3?"},
                {"role": "assistant", "content": "Six."}]


def messages_row(i):
    return {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}


def sharegpt_row(i):
    return {"conversations": [{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": f"Answer {i}."}]}


def alpaca_row(i):
    return {"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."}


MAKERS = {"messages": messages_row, "sharegpt": sharegpt_row, "alpaca": alpaca_row}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_file(path, rows):
    """rows as .jsonl, .json (an array) or .parquet, by the path's suffix."""
    if path.suffix == ".jsonl":
        return write_jsonl(path, rows)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def read_jsonl(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def local_cfg(tmp_path, train, *overrides):
    return compose_cfg(["dataset=local", f"dataset.train_file={train}",
                        f"paths.data_dir={tmp_path / 'data'}", *overrides]).dataset


# ---- conversion ------------------------------------------------------------------------------------------------


def test_sharegpt_and_alpaca_rows_become_the_same_messages():
    sharegpt = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "What is 2 plus 2?"}, {"from": "gpt", "value": "Four."},
        {"from": "human", "value": "And 3 plus 3?"}, {"from": "gpt", "value": "Six."}]}
    alpaca = {"system": "Be brief.", "history": [["What is 2 plus 2?", "Four."]], "instruction": "And 3 plus 3?",
              "output": "Six."}
    assert Converter("sharegpt").convert(sharegpt, "line 1") == {"messages": CONVERSATION}
    assert Converter("alpaca").convert(alpaca, "line 1") == {"messages": CONVERSATION}
    with_input = Converter("alpaca").convert({"instruction": "Translate.", "input": "hola", "output": "hello"}, "x")
    assert with_input["messages"][0] == {"role": "user", "content": "Translate.\n\nhola"}
    # a messages row keeps its extras (ultrachat's prompt/prompt_id)
    ultrachat = {"prompt": "q", "prompt_id": "1", "messages": CONVERSATION}
    assert Converter("auto").convert(ultrachat, "line 1") is ultrachat


@pytest.mark.parametrize("fmt, row, rule, words", [
    ("sharegpt", {"conversations": [{"from": "robot", "value": "hi"}]}, "sharegpt-from", "expected human, gpt"),
    ("sharegpt", {"conversations": []}, "sharegpt-conversations", "non-empty list"),
    ("alpaca", {"instruction": "q", "output": ""}, "alpaca-fields", "'output' must be a non-empty string"),
    ("messages", sharegpt_row(0), "format", "needs 'messages' but this one has 'conversations'"),
    ("auto", {"text": "hello"}, "format", "no 'messages', 'conversations' or 'instruction' field"),
])
def test_rows_that_cannot_be_converted_say_why(fmt, row, rule, words):
    with pytest.raises(ConversionProblem) as info:
        Converter(fmt).convert(row, "line 1")
    assert info.value.rule == rule and words in info.value.detail


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca"])
def test_each_format_in_a_split_file_is_validated_and_rewritten_as_messages(tmp_path, fmt):
    path = write_jsonl(tmp_path / "train_sft.jsonl", [MAKERS[fmt](i) for i in range(3)])
    report = validate_file(path, "train_sft", fmt="auto")
    assert report.valid == 3 and report.converted is (fmt != "messages")
    assert read_jsonl(path) == [messages_row(i) for i in range(3)]


def test_the_same_rules_apply_after_conversion_with_the_source_line(tmp_path):
    rows = [sharegpt_row(0), sharegpt_row(1),
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "human", "value": "Hello?"}]},
            {"conversations": [{"from": "human", "value": "Only a question"}]},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " "}]}]
    path = write_jsonl(tmp_path / "train_sft.jsonl", rows)
    with pytest.raises(DataValidationError) as info:
        validate_file(path, "train_sft", fmt="sharegpt")
    message = str(info.value)
    assert f"{path}:3: [alternation] messages[1].role='user' where 'assistant' was expected" in message
    assert f"{path}:4: [sft-ends-with-assistant]" in message and "(after conversion from sharegpt)" in message
    assert f"{path}:5: [content-non-empty-string]" in message
    assert read_jsonl(path) == rows  # error mode: the file is left as it was


def test_a_row_of_another_format_is_an_error_naming_its_line(tmp_path):
    path = write_jsonl(tmp_path / "train_sft.jsonl", [sharegpt_row(0), sharegpt_row(1), alpaca_row(2),
                                                      messages_row(3)])
    with pytest.raises(DataValidationError) as info:
        validate_file(path, "train_sft", fmt="auto")
    message = str(info.value)
    assert f"{path}:3: [format-mixed] a alpaca row in a sharegpt file (format decided by line 1)" in message
    assert f"{path}:4: [format-mixed] a messages row" in message and "2 invalid row(s)" in message


def test_skip_mode_drops_the_odd_rows_and_writes_the_rest_as_messages(tmp_path):
    path = write_jsonl(tmp_path / "train_sft.jsonl", [alpaca_row(0), messages_row(1), alpaca_row(2)])
    report = validate_file(path, "train_sft", fmt="auto", on_invalid="skip")
    assert (report.valid, report.rejected_lines, report.converted) == (2, 1, True)
    assert read_jsonl(path) == [messages_row(0), messages_row(2)]
    assert [(r["line"], r["rule"]) for r in read_jsonl(report.rejects_file)] == [(2, "format-mixed")]


# ---- derived ids -----------------------------------------------------------------------------------------------


def test_ids_are_derived_from_the_content_when_prompt_id_is_absent():
    assert row_id({"prompt_id": "abc", **messages_row(0)}) == "abc"
    derived = row_id(messages_row(0))
    assert derived.startswith("content:") and derived == row_id(json.loads(json.dumps(messages_row(0))))
    assert derived != row_id(messages_row(1))
    # the same conversation in another format has the same id once converted
    assert row_id(Converter("sharegpt").convert(sharegpt_row(0), "x")) == derived


def test_the_same_conversation_twice_is_found_by_content(tmp_path):
    path = write_jsonl(tmp_path / "train_sft.jsonl", [messages_row(0), messages_row(1), messages_row(0)])
    with pytest.raises(DataValidationError, match=rf"{path}:3: \[duplicate-conversation\] the same conversation "
                                                  r"as line 1"):
        validate_file(path, "train_sft")


def test_openai_format_rows_pass_where_prompt_id_was_required(tmp_path):
    """The issue's report: a folder of OpenAI-format rows under dataset=ultrachat_200k dataset.name=<folder>."""
    src = tmp_path / "my_chats"
    src.mkdir()
    for split, start in (("train_sft", 0), ("test_sft", 100), ("train_gen", 200), ("test_gen", 300)):
        write_jsonl(src / f"{split}.jsonl", [messages_row(start + i) for i in range(20)])
    cfg = compose_cfg(["dataset=ultrachat_200k", f"dataset.name={src}", "dataset.split_percent=100",
                       f"paths.data_dir={tmp_path / 'data'}"]).dataset
    out = run_data_step(cfg, run_dir=tmp_path / "run")
    assert out["rows"] == {"train_sft": 20, "test_sft": 20, "train_gen": 20, "test_gen": 20}
    assert out["download_dir"] == str((tmp_path / "data" / "my_chats").resolve())  # named after the data


# ---- file types --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca"])
def test_every_format_in_every_file_type_gives_the_same_splits(tmp_path, fmt, suffix):
    train = write_file(tmp_path / f"chats{suffix}", [MAKERS[fmt](i) for i in range(40)])
    out = run_data_step(local_cfg(tmp_path, train), run_dir=tmp_path / "run")
    assert out["rows"] == {"train_sft": 38, "test_sft": 2, "train_gen": 38, "test_gen": 2}
    train_rows, eval_rows = read_jsonl(out["train_file"]), read_jsonl(out["test_file"])
    assert sorted(train_rows + eval_rows, key=lambda r: int(r["messages"][0]["content"][9:-1])) == \
        [messages_row(i) for i in range(40)]
    assert read_jsonl(out["sample_file"]) == eval_rows  # the sample request comes from the eval rows
    assert out["download_dir"].endswith(os.path.join("data", "chats"))
    assert out["sources"]["train"]["converted"] is (fmt != "messages")
    assert open(out["exploration"]["plot"], "rb").read(4) == b"\x89PNG"  # explored after conversion, as ever
    summary = json.loads(open(out["exploration"]["summary_json"]).read())
    assert summary["train_sft"]["roles"] == {"user": 38, "assistant": 38} and summary["train_sft"]["duplicates"] == 0


@pytest.mark.parametrize("suffix, where", [(".jsonl", ":3:"), (".json", " row 3:"), (".parquet", " row 3:")])
def test_errors_name_the_line_or_row_of_the_users_file(tmp_path, suffix, where):
    rows = [messages_row(0), messages_row(1),
            {"messages": [{"role": "user", "content": "Q"}, {"role": "bot", "content": "A"}]}]
    train = write_file(tmp_path / f"chats{suffix}", rows)
    with pytest.raises(DataValidationError) as info:
        run_data_step(local_cfg(tmp_path, train), run_dir=tmp_path / "run")
    assert f"{train}{where} [role-allowed] messages[1].role='bot'; allowed roles" in str(info.value)
    assert not (tmp_path / "data" / "chats" / "train_sft.jsonl").exists()  # nothing half-written


def test_a_line_that_is_not_utf8_is_named_in_a_local_file(tmp_path):
    train = tmp_path / "chats.jsonl"
    train.write_bytes(b"".join(json.dumps(messages_row(i)).encode() + b"\n" for i in range(3))
                      + b'{"messages": "caf\xe9"}\n')
    with pytest.raises(DataValidationError, match=rf"{train}:4: \[valid-json\] not UTF-8 text"):
        run_data_step(local_cfg(tmp_path, train), run_dir=tmp_path / "run")


def test_a_broken_json_array_is_named_with_its_line(tmp_path):
    train = tmp_path / "chats.json"
    train.write_text('[\n {"messages": []},\n {"messages": [}\n]\n')
    with pytest.raises(DataValidationError, match=rf"{train}:3: not valid JSON"):
        run_data_step(local_cfg(tmp_path, train), run_dir=tmp_path / "run")


# ---- the held-out split and dataset=local ------------------------------------------------------------------------


def test_the_held_out_split_is_stable_across_runs_and_follows_the_seed(tmp_path):
    rows = [messages_row(i) for i in range(200)]
    train, held = hold_out(rows, 5, 42)
    assert len(held) == 10 and len(train) == 190 and held == hold_out(list(rows), 5, 42)[1]
    assert hold_out(rows, 5, 7)[1] != held  # another seed, another split
    # adding rows at the end keeps most of the held-out rows where they were
    assert len([r for r in hold_out(rows + [messages_row(i) for i in range(200, 210)], 5, 42)[1] if r in held]) >= 8
    # and across separate runs of the data step: the same files, byte for byte
    path = write_jsonl(tmp_path / "chats.jsonl", rows)
    first = run_data_step(local_cfg(tmp_path, path), run_dir=tmp_path / "run1")
    again = run_data_step(local_cfg(tmp_path, path, "dataset.force=true"), run_dir=tmp_path / "run2")
    assert again["cached"] is False and again["files_sha256"] == first["files_sha256"]
    assert read_jsonl(first["test_file"]) == held
    cached = run_data_step(local_cfg(tmp_path, path), run_dir=tmp_path / "run3")
    assert cached["cached"] is True and cached["files_sha256"] == first["files_sha256"]


def test_an_eval_file_is_used_instead_of_holding_rows_out(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [sharegpt_row(i) for i in range(10)])
    evals = write_file(tmp_path / "eval.parquet", [alpaca_row(i) for i in range(100, 103)] + [alpaca_row(4)])
    out = run_data_step(local_cfg(tmp_path, train, f"dataset.eval_file={evals}", "dataset.name=support-bot"),
                        run_dir=tmp_path / "run")
    assert out["rows"] == {"train_sft": 10, "test_sft": 4, "train_gen": 10, "test_gen": 4}
    assert read_jsonl(out["test_file"]) == [messages_row(i) for i in (100, 101, 102, 4)]
    assert out["sources"]["eval"]["also_in_train"] == 1 and "1 of 4 eval row(s) are also in" in capsys.readouterr().out
    assert out["download_dir"].endswith("support-bot")


def test_an_edited_train_file_is_read_again(tmp_path):
    path = write_jsonl(tmp_path / "chats.jsonl", [messages_row(i) for i in range(20)])
    run_data_step(local_cfg(tmp_path, path), run_dir=tmp_path / "run")
    write_jsonl(path, [messages_row(i) for i in range(40)])
    again = run_data_step(local_cfg(tmp_path, path), run_dir=tmp_path / "run")
    assert again["cached"] is False and again["rows"]["train_sft"] == 38


def test_skip_mode_on_a_local_file_drops_rows_with_a_rejects_file(tmp_path):
    rows = [messages_row(i) for i in range(20)] + [messages_row(3), {"messages": []}]
    path = write_jsonl(tmp_path / "chats.jsonl", rows)
    out = run_data_step(local_cfg(tmp_path, path, "dataset.on_invalid=skip"), run_dir=tmp_path / "run")
    assert out["rows"]["train_sft"] + out["rows"]["test_sft"] == 20
    source = out["sources"]["train"]
    assert (source["rows"], source["valid"], source["rejected"]) == (22, 20, 2)
    assert [(r["line"], r["rule"]) for r in read_jsonl(source["rejects_file"])] == [
        (21, "duplicate-conversation"), (22, "messages-non-empty-list")]


@pytest.mark.parametrize("overrides, message", [
    ((), r"dataset=local needs dataset.train_file=PATH"),
    (("dataset.train_file=/no/such/chats.jsonl",), r"dataset.train_file=/no/such/chats.jsonl: no such file"),
    (("dataset.eval_percent=100",), r"dataset.eval_percent=100.0 must be in \(0, 100\)"),
])
def test_bad_local_requests_are_refused(tmp_path, overrides, message):
    path = write_jsonl(tmp_path / "chats.jsonl", [messages_row(i) for i in range(5)])
    base = [f"dataset.train_file={path}"] if overrides and overrides[0].startswith("dataset.eval") else []
    cfg = compose_cfg(["dataset=local", f"paths.data_dir={tmp_path / 'data'}", *base, *overrides]).dataset
    with pytest.raises(DatasetRequestError, match=message):
        run_data_step(cfg, run_dir=tmp_path / "run")


# ---- dataset.columns ---------------------------------------------------------------------------------------------


def test_columns_map_a_datasets_own_names(tmp_path):
    """A dataset whose chat column is `conversation` (as some hub datasets name it), read through `datasets`."""
    import pandas as pd

    src = tmp_path / "hubish"
    src.mkdir()
    for split in ("train_sft", "test_sft"):
        pd.DataFrame([{"id": i, "conversation": messages_row(i)["messages"]} for i in range(10)]).to_parquet(
            src / f"{split}.parquet")
    with pytest.raises(DatasetRequestError, match=r"no chat column.*dataset.columns.messages=conversation"):
        download_splits(str(src), ["train_sft"], 100, tmp_path / "plain")
    cfg = compose_cfg(["dataset=ultrachat_200k", f"dataset.name={src}", "dataset.split_percent=100",
                       "dataset.splits=[train_sft,test_sft]", "dataset.sample_split=test_sft",
                       "dataset.columns.messages=conversation", f"paths.data_dir={tmp_path / 'data'}"]).dataset
    out = run_data_step(cfg, run_dir=tmp_path / "run")
    assert out["rows"] == {"train_sft": 10, "test_sft": 10}
    assert read_jsonl(out["train_file"]) == [messages_row(i) for i in range(10)]
    again = run_data_step(cfg, run_dir=tmp_path / "run2")  # the converted files are a cache hit, read as messages
    assert again["cached"] is True and again["files_sha256"] == out["files_sha256"]


# ---- names -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, slug", [
    ("HuggingFaceH4/ultrachat_200k", "ultrachat_200k"), ("sample", "sample"), ("/home/me/chats.jsonl", "chats"),
    ("/data/support chats/", "support-chats"), ("C:\\data\\tickets.parquet", "tickets"), ("", "local"),
    (None, "local"), ("ünïcode!.json", "n-code"),
])
def test_dataset_slugs(name, slug):
    assert dataset_slug(name) == slug


def test_the_registered_model_is_named_after_the_dataset_used():
    names = {preset: compose_cfg([f"dataset={preset}", "dataset.train_file=/d/my_chats.jsonl"])
             for preset in ("sample", "ultrachat_200k", "local")}
    assert names["sample"].mlflow.registered_model_name == "tiny-phi3-sample"
    assert names["ultrachat_200k"].mlflow.registered_model_name == "tiny-phi3-ultrachat-200k"
    assert names["local"].mlflow.registered_model_name == "tiny-phi3-my-chats"
    assert names["local"].dataset.download_dir.endswith(os.path.join("data", "my_chats"))
    named = compose_cfg(["dataset=local", "dataset.train_file=/d/x.jsonl", "dataset.name=Support Bot v2"])
    assert named.mlflow.registered_model_name == "tiny-phi3-Support-Bot-v2"
    assert compose_cfg(["experiment=phi3_ultrachat"]).mlflow.registered_model_name == \
        "Phi-3-mini-4k-instruct-ultrachat-200k"
    assert model_name("m", "a_b.c") == "m-a-b.c"
