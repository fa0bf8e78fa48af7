"""The offline sample: learnable (every question has one answer), varied, and the manifest it writes."""

import json
from collections import defaultdict

from runner.data.sample import generate_rows, write_sample_dataset
from runner.data.validate import validate_file


def test_each_opening_question_has_exactly_one_answer():
    """What makes it learnable by a tiny model: the first reply is a function of the first question."""
    answers = defaultdict(set)
    for split in ("train_sft", "test_sft"):
        for row in generate_rows(2000, 3, split):
            user = next(i for i, m in enumerate(row["messages"]) if m["role"] == "user")
            answers[row["messages"][user]["content"]].add(row["messages"][user + 1]["content"])
    assert all(len(replies) == 1 for replies in answers.values())
    train = {r["prompt"] for r in generate_rows(480, 42, "train_sft")}
    test = [r["prompt"] for r in generate_rows(64, 42, "test_sft")]
    assert sum(p in train for p in test) >= len(test) // 2  # the test questions are of the kinds trained on


def test_lengths_turns_and_system_messages_vary():
    rows = generate_rows(5000, 0, "train_sft")
    lengths = [sum(len(m["content"]) for m in r["messages"]) for r in rows]
    assert min(lengths) < 60 and max(lengths) > 300
    assert len({len(r["messages"]) for r in rows}) >= 4
    assert 0.1 < sum(r["messages"][0]["role"] == "system" for r in rows) / len(rows) < 0.5


def test_write_sample_dataset_manifest(tmp_path):
    manifest = write_sample_dataset(tmp_path, {"train_sft": 12, "test_gen": 3}, seed=5)
    assert manifest["request"] == {"source": "sample", "seed": 5, "sample_rows": {"train_sft": 12, "test_gen": 3},
                                   "split_percent": 100.0}
    assert manifest["splits"]["train_sft"]["rows"] == 12
    assert json.loads((tmp_path / "manifest.json").read_text())["splits"] == manifest["splits"]
    rows = [json.loads(x) for x in (tmp_path / "test_gen.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows == generate_rows(3, 5, "test_gen")
    assert validate_file(tmp_path / "test_gen.jsonl", "test_gen").valid == 3
