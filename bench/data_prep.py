"""Data preparation speed: the runner's one-pass validate + convert + split-percent selection against the plain
`datasets` pipeline (load_dataset("json") + select + filter with the same checks + to_json), side by side.

    python bench/data_prep.py [--rows 200000] [--percent 100]

Generates ultrachat-shaped rows of realistic size (~1.4 KB of text each) into a temp folder first (not timed).
Target: all 200k rows in <= 10 s on 2 cores, and not slower than the datasets baseline.
"""

import argparse
import hashlib
import json
import os
import random
import tempfile
import time
from pathlib import Path

WORDS = ("the model data chat answer question user assistant train token river city light paper music green "
         "quick brown fox jumps over lazy dog café naïve über 東京 数据 réponse").split()


def make_rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    for i in range(n):
        turns = rng.choice((1, 2, 2, 3))
        budget = 1400 // (2 * turns)
        messages = []
        for _ in range(turns):
            for role in ("user", "assistant"):
                text = " ".join(rng.choice(WORDS) for _ in range(budget // 6))
                messages.append({"role": role, "content": text})
        yield {"prompt": messages[0]["content"], "prompt_id": hashlib.sha256(str(i).encode()).hexdigest(),
               "messages": messages}


def runner_pipeline(src: Path, dst: Path, percent: float) -> int:
    """Ours: count lines, keep the first `percent`%, validate each with the runner's rules, write the clean ones."""
    from runner.data.validate import check_row

    with open(src, "rb") as f:
        total = sum(1 for _ in f)
    keep = round(total * percent / 100)
    seen = set()
    written = 0
    loads = json.loads
    with open(src, encoding="utf-8") as f, open(dst, "w", encoding="utf-8") as out:
        for number, line in enumerate(f):
            if number >= keep:
                break
            try:
                row = loads(line)
            except ValueError:
                continue
            if check_row(row, sft=True) is None and row["prompt_id"] not in seen:
                seen.add(row["prompt_id"])
                out.write(line)  # the row is already in the target schema: no re-serialisation
                written += 1
    return written


def datasets_pipeline(src: Path, dst: Path, percent: float, cache_dir: str) -> int:
    """Baseline: the same selection and checks the way a `datasets` user writes them."""
    from datasets import load_dataset

    from runner.data.validate import check_row

    data = load_dataset("json", data_files=str(src), split="train", cache_dir=cache_dir)
    data = data.select(range(round(len(data) * percent / 100)))
    data = data.filter(lambda row: check_row(row, sft=True) is None)
    ids = data["prompt_id"]
    first = {}
    for i, pid in enumerate(ids):
        first.setdefault(pid, i)
    if len(first) != len(ids):
        data = data.select(sorted(first.values()))
    data.to_json(str(dst), lines=True, force_ascii=False)
    return len(data)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--percent", type=float, default=100.0)
    args = parser.parse_args()
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "train_sft.jsonl"
        start = time.perf_counter()
        with open(src, "w", encoding="utf-8") as f:
            for row in make_rows(args.rows):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        size = os.path.getsize(src)
        print(f"generated {args.rows:,} rows, {size / 1e6:.0f} MB ({size / args.rows / 1e3:.2f} KB/row) in "
              f"{time.perf_counter() - start:.1f}s (not timed below); selecting the first {args.percent:g}%")
        results = {}
        for name, fn in (("datasets load_dataset(json)+select+filter (baseline)",
                          lambda: datasets_pipeline(src, Path(tmp) / "baseline.jsonl", args.percent, tmp + "/hf")),
                         ("runner one-pass validate+convert+select",
                          lambda: runner_pipeline(src, Path(tmp) / "runner.jsonl", args.percent))):
            start = time.perf_counter()
            rows = fn()
            results[name] = (rows, time.perf_counter() - start)
    print(f"{'pipeline':<56} {'rows':>9} {'seconds':>8} {'rows/s':>10}")
    for name, (rows, seconds) in results.items():
        print(f"{name:<56} {rows:>9,} {seconds:>8.2f} {rows / seconds:>10,.0f}")
    (b_rows, b_s), (r_rows, r_s) = results.values()
    assert b_rows == r_rows, f"the pipelines disagree: {b_rows} vs {r_rows} rows"
    print(f"speed-up runner / datasets: {b_s / r_s:.2f}x; target: <= 10 s for all rows and >= 1.0x -> "
          f"{'met' if r_s <= 10 and b_s / r_s >= 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
