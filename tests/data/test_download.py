"""Download of local splits: the streaming JSONL path agrees with `datasets` row for row, keeps source line numbers,
and the manifest cache trusts only files that still hash as recorded. The CLI script around it."""

import json

import pytest

from runner.data.download import DatasetRequestError, copy_jsonl_percent, download_splits, rows_for_percent
from runner.data.validate import DataValidationError, validate_file


def row(i):
    return {"prompt": f"Q{i}?", "prompt_id": f"{i:064x}",
            "messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]}


def write_lines(path, lines, end="\n"):
    path.write_text(end.join(lines) + end, encoding="utf-8")
    return path


@pytest.mark.parametrize("total, percent", [(1000, 5), (7, 50), (5, 50), (9, 50), (11, 100), (3, 33)])
def test_streaming_copy_takes_exactly_the_rows_datasets_takes(tmp_path, total, percent):
    from datasets import load_dataset

    src = write_lines(tmp_path / "train_sft.jsonl", [json.dumps(row(i)) for i in range(total)])
    expected = load_dataset("json", data_files={"train_sft": str(src)}, split=f"train_sft[0%:{percent}%]",
                            cache_dir=str(tmp_path / "hf"))
    rows, _ = copy_jsonl_percent(src, tmp_path / "out.jsonl", percent)
    copied = [json.loads(line)["prompt"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows == len(expected) == rows_for_percent(total, percent)
    assert copied == expected["prompt"]


@pytest.mark.parametrize("percent, rows", [(0.5, 1), (12.5, 25), (33.4, 67)])
def test_a_fractional_percent_is_the_same_on_the_streaming_and_the_datasets_path(tmp_path, percent, rows):
    """datasets' slice syntax takes whole percents only; both paths take round(percent * rows / 100)."""
    import pandas as pd

    src = tmp_path / "src"
    src.mkdir()
    write_lines(src / "train_sft.jsonl", [json.dumps(row(i)) for i in range(200)])
    pd.DataFrame([row(i) for i in range(200)]).to_parquet(src / "test_sft.parquet")
    manifest = download_splits(str(src), ["train_sft", "test_sft"], percent, tmp_path / "out")
    assert manifest["splits"]["train_sft"]["rows"] == manifest["splits"]["test_sft"]["rows"] == rows
    assert (tmp_path / "out" / "train_sft.jsonl").read_text() == (tmp_path / "out" / "test_sft.jsonl").read_text()


def test_a_percent_that_selects_no_rows_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_lines(src / "train_sft.jsonl", [json.dumps(row(i)) for i in range(200)])
    with pytest.raises(DatasetRequestError, match=r"first 0.1% is no rows"):
        download_splits(str(src), ["train_sft"], 0.1, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_jsonl_and_parquet_sources_give_the_same_rows(tmp_path):
    import pandas as pd

    src = tmp_path / "src"
    src.mkdir()
    write_lines(src / "train_sft.jsonl", [json.dumps(row(i)) for i in range(333)])
    pd.DataFrame([row(i) for i in range(333)]).to_parquet(src / "test_sft.parquet")
    manifest = download_splits(str(src), ["train_sft", "test_sft"], 10, tmp_path / "out")
    assert manifest["splits"]["train_sft"]["rows"] == manifest["splits"]["test_sft"]["rows"] == 33
    train = [json.loads(x) for x in (tmp_path / "out" / "train_sft.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (tmp_path / "out" / "test_sft.jsonl").read_text().splitlines()]
    assert train == test == [row(i) for i in range(33)]


def test_copied_lines_keep_their_source_line_numbers(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    lines = [json.dumps(row(0)), "", json.dumps(row(1)), json.dumps({**row(2), "prompt": "other"}), json.dumps(row(3))]
    (src / "train_sft.jsonl").write_text("\n".join(lines))  # a blank line 2 and no final newline
    manifest = download_splits(str(src), ["train_sft"], 100, tmp_path / "out")
    assert manifest["splits"]["train_sft"]["rows"] == 4  # blank lines are not rows
    out = tmp_path / "out" / "train_sft.jsonl"
    assert out.read_text().endswith("\n")
    with pytest.raises(DataValidationError, match=rf"{out}:4: \[prompt-equals-first-user\]"):
        validate_file(out, "train_sft")  # line 4 is the line to fix in the source too


def test_cache_hit_needs_the_recorded_sha256(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_lines(src / "train_sft.jsonl", [json.dumps(row(i)) for i in range(100)])
    out = tmp_path / "out"
    first = download_splits(str(src), ["train_sft"], 50, out)
    assert download_splits(str(src), ["train_sft"], 50, out)["cached"] is True
    (out / "train_sft.jsonl").write_text(json.dumps(row(0)) + "\n")  # edited (or truncated) by hand
    again = download_splits(str(src), ["train_sft"], 50, out)
    assert again["cached"] is False and again["splits"]["train_sft"]["rows"] == 50
    assert again["splits"]["train_sft"]["sha256"] == first["splits"]["train_sft"]["sha256"]


def test_an_unreachable_hub_is_a_clear_error(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceH4/ultrachat_200k' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DatasetRequestError, match="hub cannot be reached.*dataset=sample"):
        download_splits("HuggingFaceH4/ultrachat_200k", ["train_sft"], 5, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_the_download_script(tmp_path, capsys):
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("download_dataset", REPO / "scripts" / "download_dataset.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    src = tmp_path / "src"
    src.mkdir()
    write_lines(src / "train_sft.jsonl", [json.dumps(row(i)) for i in range(40)] + ["{broken"])
    out = tmp_path / "out"
    args = ["--dataset", str(src), "--splits", "train_sft", "--download-dir", str(out), "--split-percent", "100"]
    assert script.main(args) == 2  # the broken line stops it, named by file and line
    assert f"{out / 'train_sft.jsonl'}:41: [valid-json]" in capsys.readouterr().err
    assert script.main(args + ["--on-invalid", "skip", "--force"]) == 0
    assert "train_sft: 40 valid rows, 1 dropped" in capsys.readouterr().out
    assert script.main(args + ["--split-percent", "0"]) == 2
    assert "(0, 100]" in capsys.readouterr().err
    assert script.main(args[:3] + ["test_sft"] + args[4:]) == 2
    assert "split 'test_sft' not found" in capsys.readouterr().err
