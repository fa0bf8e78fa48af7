"""Chat data -> token ids + assistant-only labels: masks token by token, truncation, the on-disk cache."""

import copy
import json
import re

import pytest

from runner.data import prepare
from runner.errors import RunnerError

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is tea made from?"},
    {"role": "assistant", "content": "Leaves of the tea plant."},
    {"role": "user", "content": "And coffee?"},
    {"role": "assistant", "content": "Roasted coffee beans."},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _write_jsonl(path, conversations):
    with open(path, "w", encoding="utf-8") as fh:
        for i, messages in enumerate(conversations):
            user = next(m["content"] for m in messages if m["role"] == "user")
            fh.write(json.dumps({"prompt": user, "prompt_id": f"id{i}", "messages": messages}) + "\n")
    return path


def test_labels_are_the_assistant_tokens_and_their_end_token(tokenizer):
    out = prepare.tokenize_conversation(CONVERSATION, tokenizer, None)
    # The expected layout, built piece by piece from the Phi-3 format: (text, counts in the loss?)
    pieces = [
        ("<|system|>\nAnswer briefly.<|end|>\n<|user|>\nWhat is tea made from?<|end|>\n<|assistant|>\n", False),
        ("Leaves of the tea plant.<|end|>", True),
        ("\n<|user|>\nAnd coffee?<|end|>\n<|assistant|>\n", False),
        ("Roasted coffee beans.<|end|>", True),
        ("\n", False),
    ]
    expected_ids, expected_labels = [], []
    for text, trained in pieces:
        ids = _encode(tokenizer, text)
        expected_ids += ids
        expected_labels += ids if trained else [-100] * len(ids)
    assert out["input_ids"] == expected_ids
    for position, (got, want) in enumerate(zip(out["labels"], expected_labels)):
        assert got == want, f"token {position} {tokenizer.decode([out['input_ids'][position]])!r}: {got} != {want}"
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    trained_ends = [i for i, (t, lab) in enumerate(zip(out["input_ids"], out["labels"])) if t == end and lab == end]
    assert len(trained_ends) == 2  # each assistant turn's closing <|end|> counts; system/user ones do not
    assert tokenizer.decode([t for t in out["labels"] if t != -100]) == (
        "Leaves of the tea plant.<|end|>Roasted coffee beans.<|end|>")
    assert not out["truncated"]


def test_template_without_generation_tags_gives_the_same_labels(tokenizer):
    untagged = copy.deepcopy(tokenizer)
    untagged.chat_template = re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", tokenizer.chat_template)
    assert "{% generation %}" not in untagged.chat_template and "add_generation_prompt" in untagged.chat_template
    assert (prepare.tokenize_conversation(CONVERSATION, untagged, None)
            == prepare.tokenize_conversation(CONVERSATION, tokenizer, None))


def test_truncation_keeps_the_head_and_drops_rows_left_without_assistant_tokens(tokenizer, tmp_path):
    full = prepare.tokenize_conversation(CONVERSATION, tokenizer, None)
    cut = prepare.tokenize_conversation(CONVERSATION, tokenizer, 30)
    assert cut["truncated"] and len(cut["input_ids"]) == 30
    assert cut["input_ids"] == full["input_ids"][:30] and cut["labels"] == full["labels"][:30]

    long_answer = [{"role": "user", "content": "Say a lot."}, {"role": "assistant", "content": "word " * 3000}]
    only_prompt = [{"role": "user", "content": "x " * 200}, {"role": "assistant", "content": "short"}]
    path = _write_jsonl(tmp_path / "train.jsonl", [CONVERSATION, long_answer, only_prompt])
    dataset, stats = prepare.tokenize_file_with_stats(path, tokenizer, 40, cache_dir=None, progress=False)
    assert max(len(ids) for ids in dataset["input_ids"]) == 40
    assert stats["truncated"] == 2 and stats["dropped_no_assistant"] == 1 and stats["rows"] == 2
    # max_seq_length <= 0: the tokenizer's model_max_length (1024 for the tiny model)
    dataset, stats = prepare.tokenize_file_with_stats(path, tokenizer, -1, cache_dir=None, progress=False)
    assert tokenizer.model_max_length == 1024
    assert max(len(ids) for ids in dataset["input_ids"]) == 1024 and stats["rows"] == 3


def test_second_call_loads_the_cache_without_tokenizing(tokenizer, tmp_path, monkeypatch):
    path = _write_jsonl(tmp_path / "train.jsonl", [CONVERSATION] * 3)
    cache = tmp_path / "cache"
    first, stats = prepare.tokenize_file_with_stats(path, tokenizer, 64, cache_dir=cache, progress=False)
    assert not stats["cache_hit"]
    assert first.column_names == ["input_ids", "labels"]  # prompt/prompt_id never reach a trainer

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again despite a cache entry")

    monkeypatch.setattr(prepare, "_tokenize_rows", no_tokenizing)
    second, stats = prepare.tokenize_file_with_stats(path, tokenizer, 64, cache_dir=cache, progress=False)
    assert stats["cache_hit"]
    assert second["input_ids"] == first["input_ids"] and second["labels"] == first["labels"]
    assert prepare.tokenize_file(path, tokenizer, 64, cache_dir=cache)["labels"] == first["labels"]

    # Each part of the key misses: another max_seq_length, another template, other data.
    for args in ((path, tokenizer, 32),):
        with pytest.raises(AssertionError, match="tokenized again"):
            prepare.tokenize_file(*args, cache_dir=cache)
    other_template = copy.deepcopy(tokenizer)
    other_template.chat_template = tokenizer.chat_template.replace("<|user|>\n", "<|user|>\n\n")
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare.tokenize_file(path, other_template, 64, cache_dir=cache)
    _write_jsonl(path, [CONVERSATION] * 4)
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare.tokenize_file(path, tokenizer, 64, cache_dir=cache)
    assert not list(cache.glob(".*"))  # no temp folder left behind


def test_bad_row_is_named_by_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n" + json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(RunnerError, match=r"bad\.jsonl:2: 'messages' must be"):
        prepare.tokenize_file(path, tokenizer, 64, cache_dir=None)
    path.write_text("{not json\n")
    with pytest.raises(RunnerError, match=r"bad\.jsonl:1: not valid JSON"):
        prepare.tokenize_file(path, tokenizer, 64, cache_dir=None)
