"""The endpoint's shrinking decoding loop against the baseline it replaced, transformers' `model.generate`, on one
batch of rows with different lengths (as a served batch has: short answers, long ones, a client that left).

    python bench/decode_loop.py                       # the tiny model built offline, batch 16, 8..128 new tokens
    python bench/decode_loop.py --model <save_pretrained folder> --batch 32 --max-new-tokens 256
    python bench/decode_loop.py --same-length      # no row ends early: the loop's own overhead

Both sides decode greedily the same prompts with the same per-row token budgets (generate cannot stop one row
early, so its rows run to the longest budget and are cut afterwards), in alternating rounds. Prints wall time of
each, their ratio, and the forward-pass rows each spent.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.endpoint_load import model_folder, prompts  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--same-length", action="store_true",
                   help="every row gets --max-new-tokens: nothing to drop, so this shows the loop's own overhead")
    args = p.parse_args(argv)

    import torch

    from runner.local.endpoint.generation import ChatGenerator, GenerationJob, set_torch_threads

    folder, cleanup = model_folder(args.model)
    try:
        generator = ChatGenerator.from_uri(str(folder))
        threads = set_torch_threads(None, generator.model)
        encoded = [generator.encode_chat(m) for m in prompts(args.batch)]
        # budgets spread from 1/16 of the longest to the longest: most rows end well before the last one
        budgets = [max(1, args.max_new_tokens * (i % 16 + 1) // 16) for i in range(args.batch)]
        if args.same_length:
            budgets = [args.max_new_tokens] * args.batch
        # every row always runs to its budget on both sides (no eos): the same tokens are produced
        no_eos = {t: -1e9 for t in generator.eos_ids}

        def ours():
            rows = []
            generator.on_forward = rows.append
            jobs = [GenerationJob(ids, n, logit_bias=no_eos) for ids, n in zip(encoded, budgets)]
            generator.run_batch(jobs)
            generator.on_forward = None
            return sum(rows)

        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), generator.pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, ids in enumerate(encoded):
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            attention[i, width - len(ids):] = 1
        bias = torch.zeros(generator.model.config.get_text_config().vocab_size)
        bias[generator.eos_ids] = -1e9

        def baseline():
            with torch.inference_mode():
                generator.model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max(budgets),
                                         do_sample=False, temperature=None, top_p=None, top_k=None,
                                         logits_processor=[lambda ids, scores: scores + bias],
                                         pad_token_id=generator.pad_id, eos_token_id=generator.eos_ids)
            return len(encoded) * max(budgets)

        times = {"shrinking loop": [], "generate (baseline)": []}
        rows = {}
        for _ in range(args.rounds):
            for name, fn in (("generate (baseline)", baseline), ("shrinking loop", ours)):
                started = time.perf_counter()
                rows[name] = fn()
                times[name].append(time.perf_counter() - started)
        print(f"model {folder}, batch {args.batch}, budgets {min(budgets)}..{max(budgets)} new tokens "
              f"({sum(budgets)} in all), torch threads {threads}, best of {args.rounds} rounds")
        for name, spent in times.items():
            print(f"  {name:20s} {min(spent):7.3f} s   forward-pass rows {rows[name]}")
        ratio = min(times["generate (baseline)"]) / min(times["shrinking loop"])
        print(f"  shrinking loop is {ratio:.2f}x the speed of generate on this batch")
    finally:
        if cleanup is not None:  # the tiny model's temporary folder
            cleanup.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
