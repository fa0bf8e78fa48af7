"""Evaluation throughput: the evaluator's batched generation against one-row-at-a-time `generate`, same rows.

    python bench/evaluate.py                       # tiny model built offline, 64 held-out sample rows, batch 16
    python bench/evaluate.py --rows 32 --max-new-tokens 32 --batch-size 8
    python bench/evaluate.py --model <save_pretrained folder>

Baseline ("one-at-a-time"): `model.generate` on each row's prompt alone, greedy, the same prompt ids and
max_new_tokens. Candidate ("batched"): the evaluator's generation (runner/local/evaluator.generate_batch, i.e. the
endpoint's ChatGenerator.run_batch) on batches of --batch-size rows in prompt-length order. Both run in this process
with the same torch threads, timed one after the other. Prints rows/s of each and their ratio (target: >= 4x at
batch 16 on a CPU), how many greedy replies agree, and the wall time of a whole evaluation (base and fine-tuned =
the same model, teacher-forced and generated metrics) on the same rows.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET_RATIO = 4.0


def _rows_file(n: int, folder: Path) -> Path:
    from runner.data.sample import generate_rows

    path = folder / "test_sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in generate_rows(n, 42, "test_sft")), encoding="utf-8")
    return path


def one_at_a_time(generator, encoded, max_new_tokens):
    import torch

    replies = []
    for e in encoded:
        ids = torch.tensor([e.prompt_ids])
        with torch.inference_mode():
            out = generator.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                           max_new_tokens=max_new_tokens, eos_token_id=generator.eos_ids,
                                           pad_token_id=generator.pad_id)
        new = [t for t in out[0, ids.shape[1]:].tolist() if t not in generator.eos_ids]
        replies.append(generator.tokenizer.decode(new, skip_special_tokens=True))
    return replies


def batched(generator, encoded, settings):
    from runner.local.evaluator import generate_batch

    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].prompt_ids))
    replies = [None] * len(encoded)
    for start in range(0, len(order), settings.batch_size):
        picked = order[start:start + settings.batch_size]
        for i, (text, _stopped, _n) in zip(picked, generate_batch(generator, [encoded[i] for i in picked], settings)):
            replies[i] = text
    return replies


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a save_pretrained folder (default: the offline tiny model)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    from runner.evaluation.rows import load_rows
    from runner.local.evaluator import EvaluatorSettings, ModelPair, encode_rows, evaluate

    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp:
        tmp = Path(tmp)
        if args.model:
            model_dir = Path(args.model)
        else:
            from runner.local.tiny_model import build_tiny_model

            print("building the offline tiny model ...", flush=True)
            model_dir = build_tiny_model(tmp / "tiny-phi3")
        rows_file = _rows_file(args.rows, tmp)
        settings = EvaluatorSettings(max_rows=args.rows, batch_size=args.batch_size,
                                     max_new_tokens=args.max_new_tokens, device="cpu")
        rows = load_rows(rows_file, max_rows=args.rows, seed=settings.seed)
        pair = ModelPair(model_dir, ft_dir=model_dir, device="cpu")
        with pair.use("ft") as generator:
            encoded = encode_rows(rows, generator, max_new_tokens=args.max_new_tokens,
                                  context_length=pair.context_length, teacher_forced=False, generated=True)
            batched(generator, encoded[:2], settings)  # warm-up: first-call costs out of both timings
            started = time.perf_counter()
            single = one_at_a_time(generator, encoded, args.max_new_tokens)
            single_s = time.perf_counter() - started
            started = time.perf_counter()
            many = batched(generator, encoded, settings)
            batched_s = time.perf_counter() - started
        started = time.perf_counter()
        evaluation = evaluate(base_dir=model_dir, ft_dir=model_dir, rows_file=rows_file, settings=settings,
                              progress=None)
        evaluate_s = time.perf_counter() - started

    n = len(encoded)
    single_rate, batched_rate = n / single_s, n / batched_s
    ratio = batched_rate / single_rate
    agree = sum(a == b for a, b in zip(single, many))
    print(f"rows: {n} held-out sample rows, max_new_tokens {args.max_new_tokens}, torch threads {pair.threads}")
    print(f"baseline  one-at-a-time generate : {single_rate:8.2f} rows/s ({single_s:.2f} s)")
    print(f"candidate batched (batch {args.batch_size:>3})    : {batched_rate:8.2f} rows/s ({batched_s:.2f} s)")
    print(f"ratio batched / one-at-a-time    : {ratio:.2f}x  (target >= {TARGET_RATIO:g}x) "
          f"{'PASS' if ratio >= TARGET_RATIO else 'FAIL'}")
    print(f"greedy replies equal             : {agree}/{n}")
    print(f"whole evaluation (base + fine-tuned, all metrics): {evaluate_s:.2f} s wall incl. loading, "
          f"{evaluation.info['rows_per_s']} rows/s scoring")
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
