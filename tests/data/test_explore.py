"""Exploration on files with known contents: turns histogram, character percentiles, role counts, duplicates, and
with the tiny model's tokenizer the token lengths and how many rows max_seq_length would truncate."""

import json

from runner.data.explore import explore


def conversation(turns, text="word", system=False):
    messages = [{"role": "system", "content": "sys"}] if system else []
    for i in range(turns):
        messages += [{"role": "user", "content": f"{text} {i}"}, {"role": "assistant", "content": f"{text} {i}!"}]
    return {"prompt": messages[-2]["content"], "prompt_id": "x", "messages": messages}


def write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_counts_on_a_known_file(tmp_path, capsys):
    rows = [conversation(1), conversation(1), conversation(2, system=True), conversation(3, text="ü" * 50)]
    files = {"train_sft": write(tmp_path / "train_sft.jsonl", rows)}
    out = explore(files, tmp_path / "run" / "data", progress=False)
    stats = out["summary"]["train_sft"]
    assert stats["rows"] == 4 and stats["duplicates"] == 1  # the two one-turn conversations are the same
    assert stats["turns"]["histogram"] == {2: 2, 4: 1, 6: 1} and stats["turns"]["max"] == 6
    assert stats["roles"] == {"user": 7, "assistant": 7, "system": 1}
    longest = sum(len(m["content"]) for m in rows[3]["messages"])
    # nearest-rank percentiles: of [13, 13, 29, 315] the p50 is the third, the system conversation
    assert stats["chars"]["max"] == longest and stats["chars"]["p50"] == len("sys") + 2 * len("word 0" + "word 0!")
    saved = json.loads(open(out["summary_json"]).read())
    assert saved["train_sft"]["turns"]["histogram"] == {"2": 2, "4": 1, "6": 1}
    assert not any(k.startswith("_") for k in saved["train_sft"])  # raw lengths stay out of the summary
    printed = capsys.readouterr().out
    assert "| train_sft | 4 | 4/6 |" in printed and "train_sft: 2: 2, 4: 1, 6: 1" in printed
    assert open(out["plot"], "rb").read(4) == b"\x89PNG"


def test_tokens_and_truncation_with_the_models_tokenizer(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [conversation(n, text="hello there") for n in (1, 2, 4, 8, 16)]
    lengths = [len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
               for r in rows]
    limit = sorted(lengths)[2]  # two rows are longer
    files = {"test_sft": write(tmp_path / "test_sft.jsonl", rows)}
    out = explore(files, tmp_path / "data", tokenizer_dir=str(tiny_model_dir), max_seq_length=limit,
                  progress=False)
    stats = out["summary"]["test_sft"]
    assert stats["tokens"]["max"] == max(lengths) and stats["tokens"]["p50"] == sorted(lengths)[2]
    assert stats["truncated_rows"] == 2 and stats["max_seq_length"] == limit
    assert f"2 (> {limit})" in open(out["summary_md"]).read()
