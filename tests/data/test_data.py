"""The data step: split-percent arithmetic, atomic writes, every validation rule with its line number, skip mode,
the manifest cache, the offline sample, the sample request and the exploration."""

import json
import os

import pytest

from runner.data.download import DatasetRequestError, download_splits
from runner.data.jsonl import write_jsonl_atomic
from runner.data.sample import generate_rows
from runner.data.sample_request import build_sample_request
from runner.data.validate import DataValidationError, validate_file
from tests.conftest import compose_cfg


def good_row(i, system=False, end_with_assistant=True):
    messages = [{"role": "system", "content": "Be brief."}] if system else []
    messages += [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
    if not end_with_assistant:
        messages.append({"role": "user", "content": "And then?"})
    return {"prompt": f"Question {i}?", "prompt_id": f"{i:064x}", "messages": messages}


@pytest.fixture
def local_dataset(tmp_path):
    """A local dataset with known row counts: 1000 train_sft rows (JSONL) and 200 test_sft rows (Parquet)."""
    import pandas as pd

    src = tmp_path / "src"
    src.mkdir()
    write_jsonl_atomic(src / "train_sft.jsonl", (good_row(i) for i in range(1000)))
    pd.DataFrame([good_row(i) for i in range(1000, 1200)]).to_parquet(src / "test_sft.parquet")
    return src


def test_split_percent_takes_the_first_n_percent_of_each_split(local_dataset, tmp_path):
    manifest = download_splits(str(local_dataset), ["train_sft", "test_sft"], 5, tmp_path / "out")
    assert manifest["splits"]["train_sft"]["rows"] == 50 and manifest["splits"]["test_sft"]["rows"] == 10
    rows = [json.loads(line) for line in (tmp_path / "out" / "train_sft.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [f"Question {i}?" for i in range(50)]  # the first 5%, in order
    assert manifest["request"]["split_percent"] == 5.0 and manifest["cached"] is False
    assert len(manifest["splits"]["train_sft"]["sha256"]) == 64
    full = download_splits(str(local_dataset), ["test_sft"], 100, tmp_path / "all")
    assert full["splits"]["test_sft"]["rows"] == 200


@pytest.mark.parametrize("percent", [0, -1, 100.5])
def test_split_percent_outside_the_range_is_refused(local_dataset, tmp_path, percent):
    with pytest.raises(DatasetRequestError, match=r"\(0, 100\]"):
        download_splits(str(local_dataset), ["train_sft"], percent, tmp_path / "out")


def test_a_missing_split_is_named(local_dataset, tmp_path):
    with pytest.raises(DatasetRequestError, match="split 'test_gen' not found"):
        download_splits(str(local_dataset), ["train_sft", "test_gen"], 5, tmp_path / "out")


def test_manifest_cache_hit_and_force(local_dataset, tmp_path):
    out = tmp_path / "out"
    download_splits(str(local_dataset), ["train_sft"], 5, out)
    stamp = (out / "train_sft.jsonl").stat().st_mtime_ns
    again = download_splits(str(local_dataset), ["train_sft"], 5, out)
    assert again["cached"] is True and (out / "train_sft.jsonl").stat().st_mtime_ns == stamp
    other = download_splits(str(local_dataset), ["train_sft"], 10, out)  # a different request is not a hit
    assert other["cached"] is False and other["splits"]["train_sft"]["rows"] == 100
    forced = download_splits(str(local_dataset), ["train_sft"], 10, out, force=True)
    assert forced["cached"] is False


def test_a_crash_mid_write_leaves_no_half_file(tmp_path):
    path = tmp_path / "train_sft.jsonl"
    path.write_text("previous complete file\n")

    def rows():
        yield good_row(0)
        yield good_row(1)
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        write_jsonl_atomic(path, rows())
    assert path.read_text() == "previous complete file\n"  # the old file is untouched, no partial one
    assert os.listdir(tmp_path) == ["train_sft.jsonl"]  # and no temp file is left behind


BAD_LINES = [
    ("valid-json", '{"prompt": "x", '),
    ("json-object", "[1, 2]"),
    ("messages-non-empty-list", json.dumps({"prompt": "a", "prompt_id": "p", "messages": []})),
    ("role-allowed", json.dumps({"prompt": "a", "prompt_id": "p", "messages": [
        {"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]})),
    ("content-non-empty-string", json.dumps({"prompt": "a", "prompt_id": "p", "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]})),
    ("alternation", json.dumps({"prompt": "a", "prompt_id": "p", "messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]})),
    ("alternation", json.dumps({"prompt": "a", "prompt_id": "p", "messages": [
        {"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "c"}]})),
    ("sft-ends-with-assistant", json.dumps(good_row(7, end_with_assistant=False))),
    ("prompt-id-present", json.dumps({**good_row(8), "prompt_id": ""})),
    ("prompt-equals-first-user", json.dumps({**good_row(9), "prompt": "something else"})),
    ("prompt-id-unique", json.dumps(good_row(0))),  # repeats line 1's prompt_id
]


@pytest.mark.parametrize("rule, bad", BAD_LINES, ids=[f"{r}-{i}" for i, (r, _) in enumerate(BAD_LINES)])
def test_each_rule_names_the_file_line_and_rule(tmp_path, rule, bad):
    path = tmp_path / "train_sft.jsonl"
    lines = [json.dumps(good_row(0)), json.dumps(good_row(1, system=True)), bad, json.dumps(good_row(3))]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataValidationError) as info:
        validate_file(path, "train_sft")
    message = str(info.value)
    assert f"{path}:3: [{rule}]" in message, message
    assert "1 invalid row(s)" in message and "dataset.on_invalid=skip" in message


def test_gen_splits_may_end_with_a_user_turn(tmp_path):
    path = tmp_path / "test_gen.jsonl"
    path.write_text(json.dumps(good_row(0, end_with_assistant=False)) + "\n")
    assert validate_file(path, "test_gen").valid == 1


def test_error_mode_lists_only_the_first_20_problems(tmp_path):
    path = tmp_path / "train_sft.jsonl"
    path.write_text("\n".join(["not json"] * 25) + "\n")
    with pytest.raises(DataValidationError) as info:
        validate_file(path, "train_sft")
    assert str(info.value).count("[valid-json]") == 20 and "and 5 more" in str(info.value)


def test_skip_mode_writes_the_clean_file_and_a_rejects_file(tmp_path):
    path = tmp_path / "train_sft.jsonl"
    rows = [json.dumps(good_row(i)) for i in range(5)]
    rows.insert(2, "garbage")
    rows.insert(4, json.dumps(good_row(9, end_with_assistant=False)))
    path.write_text("\n".join(rows) + "\n")
    report = validate_file(path, "train_sft", on_invalid="skip")
    assert (report.rows, report.valid, report.rejected_lines) == (7, 5, 2)
    clean = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["prompt"] for r in clean] == [f"Question {i}?" for i in range(5)]
    rejects = [json.loads(line) for line in (tmp_path / "train_sft.rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["rule"]) for r in rejects] == [(3, "valid-json"), (5, "sft-ends-with-assistant")]
    assert validate_file(path, "train_sft").problems == []  # the rewritten file is clean


def test_sample_generator_is_deterministic_and_in_the_ultrachat_schema(tmp_path):
    rows = generate_rows(300, 7, "train_sft")
    assert rows == generate_rows(300, 7, "train_sft")
    assert rows != generate_rows(300, 8, "train_sft") and rows != generate_rows(300, 7, "test_sft")
    assert len({r["prompt_id"] for r in rows}) == 300
    assert all(len(r["prompt_id"]) == 64 and set(r) == {"prompt", "prompt_id", "messages"} for r in rows)
    assert any(r["messages"][0]["role"] == "system" for r in rows)
    assert any(len(r["messages"]) >= 6 for r in rows)  # several turns
    assert any(any(ord(ch) > 127 for m in r["messages"] for ch in m["content"]) for r in rows)  # unicode
    path = tmp_path / "train_sft.jsonl"
    write_jsonl_atomic(path, rows)
    assert validate_file(path, "train_sft").valid == 300


def test_sample_request_is_a_seeded_row_in_the_notebooks_format(tmp_path):
    path = tmp_path / "test_gen.jsonl"
    write_jsonl_atomic(path, generate_rows(20, 1, "test_gen"))
    params = {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 200}
    request = build_sample_request(path, 42, params)
    assert request == build_sample_request(path, 42, params)
    assert set(request) == {"input_data", "params"} and request["params"] == {}
    assert request["input_data"]["parameters"] == params
    (conversation,) = request["input_data"]["input_string"]
    assert conversation[-1]["role"] == "user"  # the endpoint is asked to write the assistant's turn
    assert all(set(m) == {"role", "content"} for m in conversation)


def test_data_step_on_the_sample_preset_explores_and_caches(tmp_path, ftrun_home, tiny_model_dir, capsys):
    from runner.data.step import run_data_step

    cfg = compose_cfg(["dataset.sample_rows.train_sft=40", "dataset.sample_rows.test_sft=8",
                       "dataset.sample_rows.train_gen=8", "dataset.sample_rows.test_gen=8"])
    out = run_data_step(cfg.dataset, run_dir=tmp_path, max_seq_length=32, tokenizer_dir=str(tiny_model_dir))
    assert out["rows"] == {"train_sft": 40, "test_sft": 8, "train_gen": 8, "test_gen": 8}
    assert out["cached"] is False and len(out["manifest_sha256"]) == 64
    assert os.path.getsize(out["exploration"]["plot"]) > 1000
    summary = json.loads(open(out["exploration"]["summary_json"]).read())
    assert summary["train_sft"]["rows"] == 40 and summary["train_sft"]["tokens"]["max"] > 0
    assert summary["train_sft"]["truncated_rows"] > 0  # max_seq_length 32 truncates some rows
    assert "| train_sft | 40 |" in capsys.readouterr().out
    again = run_data_step(cfg.dataset, run_dir=tmp_path, max_seq_length=32)
    assert again["cached"] is True and again["manifest_sha256"] == out["manifest_sha256"]


def test_data_step_alone_counts_tokens_when_the_model_is_already_here(tmp_path, ftrun_home, monkeypatch):
    """`ftrun steps=[data]` without the model step uses an already-built base model's tokenizer."""
    from runner.local.backend import LocalBackend
    from runner.local.models import resolve_base_model
    from runner.workflow import run

    cfg = compose_cfg(["steps=[data]", "dataset.sample_rows.train_sft=20", "dataset.sample_rows.test_sft=4",
                       "dataset.sample_rows.train_gen=4", "dataset.sample_rows.test_gen=4"])
    before = run(cfg, run_dir=tmp_path / "a", backend=LocalBackend(cfg))
    summary = json.loads(open(before.output("data", "exploration")["summary_json"]).read())
    assert "tokens" not in summary["train_sft"]  # no model on this machine yet: characters only, nothing built
    resolve_base_model(cfg.model, models_dir=cfg.paths.models_dir)  # the model step builds it once
    after = run(cfg, run_dir=tmp_path / "b", backend=LocalBackend(cfg))
    summary = json.loads(open(after.output("data", "exploration")["summary_json"]).read())
    assert summary["train_sft"]["tokens"]["p50"] > 0
