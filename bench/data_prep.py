"""Data preparation speed: the runner's own data-step code against the plain `datasets` pipeline doing the same
work, side by side in one run.

    python bench/data_prep.py [--rows 200000] [--percent 100]

Both take a local JSONL split, select its first N percent, drop every row that breaks a validation rule (the
runner's rules, `runner.data.validate.check_row`, plus unique prompt_id) and write the kept rows as JSONL:
  - runner:   runner.data.download.download_splits (a local JSONL split: one streaming copy of the first N percent)
              + runner.data.validate.validate_file(on_invalid="skip") (one parse per row, clean file + rejects file)
              — exactly what the data step runs;
  - baseline: datasets.load_dataset("json", split="train_sft[0%:N%]") + filter(check_row) + first-of-each-prompt_id
              select + to_json.
The two outputs are compared row for row (prompt_ids in order) before any figure is printed.

The input (not timed) is ultrachat-shaped rows with about 1.4 KB of text each (prompt + every message's content),
1-3 user/assistant exchanges, some non-ASCII, and 0.5% rows that break a rule (alternation, empty content, a
repeated prompt_id, prompt != first user message, an sft conversation ending with the user).
Target: all 200k rows in <= 10 s on 2 cores, and not slower than the datasets baseline.
"""

import argparse
import contextlib
import io
import json
import os
import random
import tempfile
import time
from pathlib import Path

WORDS = ("the model data chat answer question user assistant train token river city light paper music green "
         "quick brown fox jumps over lazy dog café naïve über 東京 数据 réponse").split()
TEXT_PER_ROW = 1400
BAD_EVERY = 200  # one row in 200 breaks a rule


def _text(rng: random.Random, chars: int) -> str:
    words, size = [], 0
    while size < chars:
        word = rng.choice(WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)


def _break(row: dict, kind: int, previous_id: str) -> dict:
    """A row that is still valid JSON of the same shape (so `datasets` can load the file) but breaks one rule."""
    messages = row["messages"]
    if kind == 0:
        messages[1]["role"] = "user"  # alternation
    elif kind == 1:
        messages[-1]["content"] = ""  # empty content
    elif kind == 2:
        row["prompt_id"] = previous_id  # repeated prompt_id
    elif kind == 3:
        row["prompt"] = "not the first user message"
    else:
        messages[-1]["role"] = "user"  # sft conversation ending with the user (and user, user)
    return row


def make_rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    previous_id = ""
    for i in range(n):
        turns = rng.choice((1, 2, 2, 3))
        per_text = TEXT_PER_ROW // (2 * turns + 1)  # +1: `prompt` repeats the first user message
        messages = [{"role": role, "content": _text(rng, per_text)} for _ in range(turns)
                    for role in ("user", "assistant")]
        prompt_id = f"{rng.getrandbits(256):064x}"
        row = {"prompt": messages[0]["content"], "prompt_id": prompt_id, "messages": messages}
        if i % BAD_EVERY == BAD_EVERY - 1:
            row = _break(row, (i // BAD_EVERY) % 5, previous_id)
        previous_id = prompt_id
        yield row


def runner_pipeline(src_dir: Path, out_dir: Path, percent: float) -> Path:
    from runner.data.download import download_splits
    from runner.data.validate import validate_file

    with contextlib.redirect_stdout(io.StringIO()):  # the step's per-split lines would interleave with the table
        manifest = download_splits(str(src_dir), ["train_sft"], percent, out_dir, force=True)
        validate_file(manifest["splits"]["train_sft"]["file"], "train_sft", on_invalid="skip")
    return out_dir / "train_sft.jsonl"


def datasets_pipeline(src_dir: Path, dst: Path, percent: float, cache_dir: str) -> Path:
    from datasets import load_dataset

    from runner.data.validate import check_row

    data = load_dataset("json", data_files={"train_sft": str(src_dir / "train_sft.jsonl")},
                        split=f"train_sft[0%:{percent:g}%]", cache_dir=cache_dir)
    data = data.filter(lambda row: check_row(row, sft=True) is None)
    first = {}
    for i, pid in enumerate(data["prompt_id"]):
        first.setdefault(pid, i)
    if len(first) != len(data):
        data = data.select(sorted(first.values()))
    data.to_json(str(dst), lines=True, force_ascii=False)
    return dst


def _prompt_ids(path: Path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["prompt_id"] for line in f if line.strip()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--percent", type=float, default=100.0)
    args = parser.parse_args()
    from datasets.utils.logging import disable_progress_bar

    from runner.data.download import rows_for_percent

    disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src_dir = tmp / "src"
        src_dir.mkdir()
        src = src_dir / "train_sft.jsonl"
        start, text = time.perf_counter(), 0
        with open(src, "w", encoding="utf-8") as f:
            for row in make_rows(args.rows):
                text += len(row["prompt"]) + sum(len(m["content"]) for m in row["messages"])
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        size = os.path.getsize(src)
        selected = rows_for_percent(args.rows, args.percent)
        print(f"input: {args.rows:,} rows, {text / args.rows / 1e3:.2f} K characters of text per row, "
              f"{size / 1e6:.0f} MB of JSONL, written in {time.perf_counter() - start:.1f} s (not timed); "
              f"selecting the first {args.percent:g}% = {selected:,} rows; {os.cpu_count()} CPU cores")
        results = {}
        for name, fn in (("datasets load_dataset(json)[0%:N%]+filter+to_json (baseline)",
                          lambda: datasets_pipeline(src_dir, tmp / "baseline.jsonl", args.percent, str(tmp / "hf"))),
                         ("runner download_splits + validate_file(skip)",
                          lambda: runner_pipeline(src_dir, tmp / "runner", args.percent))):
            start = time.perf_counter()
            out = fn()
            results[name] = (time.perf_counter() - start, out)
        (b_s, b_out), (r_s, r_out) = results.values()
        b_ids, r_ids = _prompt_ids(b_out), _prompt_ids(r_out)
        assert b_ids == r_ids, f"the pipelines disagree: {len(b_ids)} vs {len(r_ids)} rows kept"
    print(f"both kept the same {len(r_ids):,} rows in the same order ({selected - len(r_ids):,} dropped)")
    print(f"{'pipeline':<62} {'seconds':>8} {'rows/s':>10}")
    for name, (seconds, _) in results.items():
        print(f"{name:<62} {seconds:>8.2f} {selected / seconds:>10,.0f}")
    print(f"speed-up runner / datasets: {b_s / r_s:.2f}x; target: <= 10 s for all rows and >= 1.0x -> "
          f"{'met' if r_s <= 10 and b_s / r_s >= 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
