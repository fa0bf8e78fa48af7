"""Training throughput: the runner's trainer against TRL's SFTTrainer with its default settings, side by side.

    pip install -e .[bench]   (TRL, the baseline; not a dependency of the runner)
    python bench/train_throughput.py [--steps 40] [--rounds 3] [--batch-size 8] [--max-seq-length 512]

Same tiny model (fresh from the same weights each run), same data (the offline sample generator's train_sft rows),
same batch size, learning rate and number of optimizer steps. The baseline is SFTTrainer as it comes (padded
batches, no packing, its default gradient checkpointing), told only what the comparison needs: the steps, batch
size, learning rate, max length, CPU, and assistant-only loss so both train the same objective. The runner's
trainer runs twice: as configured by default (padding-free packing) and with packing off, to show what packing
itself buys.

Effective tokens/s = non-padding tokens trained on / wall time of the trainer's `train()` call (tokenizing is
outside the timing for all). Rounds alternate the contenders so machine load hits them alike; the table prints
every round and the median. Targets: runner >= 1.5x the baseline, padding <= 5%.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _runner_params(steps, batch_size, max_len, lr, packing):
    import dataclasses

    from runner.schema import FinetuneConfig, LocalFinetuneConfig

    def defaults(cls):
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls) if f.name != "local"}

    params, local = defaults(FinetuneConfig), defaults(LocalFinetuneConfig)
    params.update(max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
                  max_seq_length=max_len, evaluation_strategy="disable", logging_steps=10, seed=0)
    local.update(packing=packing, eval_before_training=False, save_steps=10**6)
    return params, local


def run_runner(model_dir, train_file, work, steps, batch_size, max_len, lr, packing):
    from runner.local.train import train

    params, local = _runner_params(steps, batch_size, max_len, lr, packing)
    result = train(model_dir=str(model_dir), train_file=str(train_file), eval_file=None, params=params, local=local,
                   out_dir=str(work), cache_dir=str(work.parent / "cache"), progress=False)
    assert result["global_step"] == steps, result
    return {"tokens": result["train_tokens"], "seconds": result["train_runtime_s"], "cpu": result["train_cpu_s"],
            "padding": result["padding_fraction"], "loss": result["train_loss"]}


def run_trl(model_dir, rows, work, steps, batch_size, max_len, lr):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl import SFTConfig, SFTTrainer

    from trl_probes import count_batches, last_loss

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # prompt/prompt_id dropped: a string `prompt` column sends SFTTrainer down the prompt-completion path
    dataset = datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows])
    config = SFTConfig(output_dir=str(work), max_steps=steps, per_device_train_batch_size=batch_size,
                       learning_rate=lr, max_length=max_len, assistant_only_loss=True, use_cpu=True, bf16=False,
                       report_to="none", save_strategy="no", logging_steps=10, disable_tqdm=True, seed=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    counts = {"real": 0, "total": 0}

    def count(real, total):
        counts["real"] += real
        counts["total"] += total

    count_batches(trainer, count)
    losses = last_loss(trainer)
    started, cpu_started = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    assert trainer.state.global_step == steps
    return {"tokens": counts["real"], "seconds": seconds, "cpu": cpu, "padding": 1 - counts["real"] / counts["total"],
            "loss": losses.loss, "gradient_checkpointing": config.gradient_checkpointing}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rows", type=int, default=480, help="train_sft rows from the sample generator")
    args = parser.parse_args(argv)
    try:  # the baseline: TRL is an extra of this project, installed for this benchmark only
        import trl  # noqa: F401
    except ImportError:
        sys.exit("bench/train_throughput.py compares against TRL's SFTTrainer: pip install -e .[bench]")

    import torch
    import transformers

    from runner.data.sample import generate_rows
    from runner.local.tiny_model import build_tiny_model

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="train_throughput."))
    model_dir = build_tiny_model(work / "tiny-phi3")
    rows = generate_rows(args.rows, 42, "train_sft")
    train_file = work / "train_sft.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    contenders = {
        "TRL SFTTrainer (defaults, padded)": lambda i: run_trl(model_dir, rows, work / f"trl{i}", args.steps,
                                                               args.batch_size, args.max_seq_length, args.lr),
        "runner (packing, default)": lambda i: run_runner(model_dir, train_file, work / f"runner{i}", args.steps,
                                                          args.batch_size, args.max_seq_length, args.lr, True),
        "runner (packing off, padded)": lambda i: run_runner(model_dir, train_file, work / f"padded{i}",
                                                             args.steps, args.batch_size, args.max_seq_length,
                                                             args.lr, False),
    }
    for name, fn in contenders.items():  # warm-up: imports, the tokenized cache, first-call allocations
        fn("warm")
    results = {name: [] for name in contenders}
    for i in range(args.rounds):
        order = list(contenders) if i % 2 == 0 else list(reversed(contenders))
        for name in order:
            results[name].append(contenders[name](i))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"tiny Phi-3 ({sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(model_dir).parameters()):,}"
          f" params), {args.rows} sample rows, batch {args.batch_size}, max_seq_length {args.max_seq_length}, "
          f"{args.steps} optimizer steps per run, {args.rounds} rounds (alternating order); torch threads "
          f"{torch.get_num_threads()}, load average {load:.2f}")
    print(f"{'contender':34s} {'effective tok/s (wall) per round':>44s} {'median':>7s} {'tok/CPU-s':>9s} "
          f"{'padding':>7s} {'loss':>6s}")
    wall, cpu = {}, {}
    for name, runs in results.items():
        rates = [r["tokens"] / r["seconds"] for r in runs]
        wall[name] = statistics.median(rates)
        cpu[name] = statistics.median(r["tokens"] / r["cpu"] for r in runs)
        print(f"{name:34s} {' '.join(f'{x:8.0f}' for x in rates):>44s} {wall[name]:7.0f} {cpu[name]:9.0f} "
              f"{statistics.median(r['padding'] for r in runs):7.1%} {statistics.median(r['loss'] for r in runs):6.3f}")
    trl, ours, padded = "TRL SFTTrainer (defaults, padded)", "runner (packing, default)", "runner (packing off, padded)"
    padding = statistics.median(r["padding"] for r in results[ours])
    per_round = [r["tokens"] / r["seconds"] / (t["tokens"] / t["seconds"]) for r, t in zip(results[ours], results[trl])]
    print(f"ratio runner / TRL SFTTrainer, effective tokens per wall second: {wall[ours] / wall[trl]:.2f}x "
          f"(per round: {', '.join(f'{x:.2f}x' for x in per_round)})")
    print(f"ratio runner / TRL SFTTrainer, effective tokens per CPU second: {cpu[ours] / cpu[trl]:.2f}x "
          f"(insensitive to other processes sharing the cores)")
    ratio = min(wall[ours] / wall[trl], cpu[ours] / cpu[trl])
    print(f"target >= 1.5x: {'met' if ratio >= 1.5 else 'NOT met'} (lower of the two: {ratio:.2f}x)")
    print(f"runner without packing / TRL: {wall[padded] / wall[trl]:.2f}x wall, {cpu[padded] / cpu[trl]:.2f}x CPU "
          f"(the trainer alone, padded like TRL)")
    print(f"runner padding fraction: {padding:.1%} (TRL: {statistics.median(r['padding'] for r in results[trl]):.1%})"
          f" — target <= 5%: {'met' if padding <= 0.05 else 'NOT met'}")
    print(f"TRL gradient_checkpointing default: {results['TRL SFTTrainer (defaults, padded)'][0]['gradient_checkpointing']}")


if __name__ == "__main__":
    main()
