"""The data step as the workflow calls it: dry run, skip mode recorded in the manifest across a cache hit, the
sample preset, and refusals of a bad request."""

import json
import os

import pytest

from runner.data.download import DatasetRequestError
from runner.data.step import run_data_step
from tests.conftest import compose_cfg

SMALL_SAMPLE = ["dataset.sample_rows.train_sft=30", "dataset.sample_rows.test_sft=6",
                "dataset.sample_rows.train_gen=6", "dataset.sample_rows.test_gen=6"]


def row(i, prompt=None):
    return {"prompt": prompt or f"Q{i}?", "prompt_id": f"{i:064x}",
            "messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": f"A{i}."}]}


def test_dry_run_plans_paths_and_writes_nothing(tmp_path):
    cfg = compose_cfg(SMALL_SAMPLE)
    out = run_data_step(cfg.dataset, run_dir=tmp_path / "run", dry_run=True)
    assert out["planned"] is True
    assert out["train_file"] == os.path.join(cfg.dataset.download_dir, "train_sft.jsonl")
    assert out["sample_file"] == out["files"]["test_gen"]
    assert not os.path.exists(cfg.dataset.download_dir) and not (tmp_path / "run").exists()
    json.dumps(out)  # the run record stores it


def test_skip_mode_is_recorded_and_survives_the_cache_hit(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for split, n in (("train_sft", 20), ("test_sft", 10), ("test_gen", 10)):
        lines = [json.dumps(row(i)) for i in range(n)]
        if split == "train_sft":
            lines[6] = json.dumps(row(6, prompt="not the first user message"))
        (src / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    overrides = ["dataset=ultrachat_200k", f"dataset.name={src}", "dataset.splits=[train_sft,test_sft,test_gen]",
                 "dataset.split_percent=100", f"dataset.download_dir={tmp_path / 'data'}"]
    with pytest.raises(Exception, match=r"train_sft.jsonl:7: \[prompt-equals-first-user\]"):
        run_data_step(compose_cfg(overrides).dataset, run_dir=tmp_path / "run")
    cfg = compose_cfg(overrides + ["dataset.on_invalid=skip"])
    first = run_data_step(cfg.dataset, run_dir=tmp_path / "run")
    assert first["rows"] == {"train_sft": 19, "test_sft": 10, "test_gen": 10}
    assert first["rejected"] == {"train_sft": 1, "test_sft": 0, "test_gen": 0} and first["cached"] is True
    manifest = json.loads(open(first["manifest"]).read())
    assert manifest["splits"]["train_sft"]["rows"] == 19 and manifest["splits"]["train_sft"]["rejected"] == 1
    assert manifest["splits"]["train_sft"]["sha256"] == first["files_sha256"]["train_sft"]
    again = run_data_step(cfg.dataset, run_dir=tmp_path / "run2")
    assert again["cached"] is True and again["rejected"]["train_sft"] == 1 and again["rows"]["train_sft"] == 19
    assert again["manifest_sha256"] == first["manifest_sha256"]  # nothing rewritten
    rejects = [json.loads(x) for x in open(again["rejects_files"]["train_sft"]).read().splitlines()]
    assert [(r["line"], r["rule"]) for r in rejects] == [(7, "prompt-equals-first-user")]


def test_the_sample_preset_end_to_end(tmp_path, capsys):
    cfg = compose_cfg(SMALL_SAMPLE)
    out = run_data_step(cfg.dataset, run_dir=tmp_path, max_seq_length=512)
    json.dumps(out)
    assert out["rows"] == {"train_sft": 30, "test_sft": 6, "train_gen": 6, "test_gen": 6}
    assert out["rejected"] == {s: 0 for s in out["rows"]} and out["cached"] is False
    assert open(out["exploration"]["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(open(out["exploration"]["summary_json"]).read())
    assert summary["test_gen"]["rows"] == 6 and "tokens" not in summary["test_gen"]  # no tokenizer given
    assert "| train_sft | 30 |" in open(out["exploration"]["summary_md"]).read()
    printed = capsys.readouterr().out
    assert "| test_gen | 6 |" in printed and "turns per conversation" in printed
    forced = run_data_step(compose_cfg(SMALL_SAMPLE + ["dataset.force=true"]).dataset, run_dir=tmp_path)
    assert forced["cached"] is False and forced["files_sha256"] == out["files_sha256"]  # deterministic


@pytest.mark.parametrize("override, message", [
    ("dataset.train_split=validation", r"dataset.train_split='validation' is not one of dataset.splits"),
    ("dataset.sample_rows.test_gen=0", r"no row count for split\(s\) \['test_gen'\]"),
    ("dataset.split_percent=150", r"\(0, 100\]"),
])
def test_bad_requests_are_refused_before_anything_is_written(tmp_path, override, message):
    cfg = compose_cfg(SMALL_SAMPLE + [override])
    with pytest.raises(DatasetRequestError, match=message):
        run_data_step(cfg.dataset, run_dir=tmp_path / "run")
    assert not os.path.exists(os.path.join(cfg.dataset.download_dir, "manifest.json"))
