"""The memory estimate against the peaks measured at full size: prints estimate, measured, ratio, and flags every
row outside the bound (never more than 5% below the measured peak, at most 25% above it).

    python bench/memory_estimate.py [--peak-unit GB|GiB] [--lora-dropout 0.0]

No GPU needed: the rows are the recorded measurements (tests/memory/test_estimate.py MEASURED: one H100 80 GB,
random-init Phi-3-mini shape, LoRA r=8 on qkv/o/gate_up/down, bf16, packing, no gradient checkpointing); the
estimate is computed from the model's shape alone. Add a row to MEASURED when a new measurement is made.

Columns: the estimate at the worst-case micro-batch (conversations x max_seq_length tokens), the peak as recorded,
their ratio, and the tokens the measured peak corresponds to under the estimate's per-token figure (a run's peak
comes from the largest micro-batch it drew, which for 4 or 8 conversations is far below the worst case).
--peak-unit GiB reads the recorded peaks as GiB instead of decimal GB; exit status 1 when a row is outside.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    from runner.memory.estimate import config_shapes, estimate_memory
    from runner.memory.terms import GB, GiB, ratio_bounds_ok
    from tests.memory.test_estimate import MEASURED, MEASURED_PARAMS, PHI3_MINI, TARGETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--peak-unit", choices=["GB", "GiB"], default="GB",
                        help="unit of the recorded peaks (train() reports max_memory_allocated()/1e9: GB)")
    parser.add_argument("--lora-dropout", type=float, default=MEASURED_PARAMS["lora_dropout"])
    args = parser.parse_args(argv)
    unit = GB if args.peak_unit == "GB" else GiB

    shapes = config_shapes(PHI3_MINI)
    params = {**MEASURED_PARAMS, "lora_dropout": args.lora_dropout}
    print(f"Phi-3-mini shape, LoRA r=8 ({', '.join(TARGETS)}), bf16, lora_dropout={args.lora_dropout}, "
          f"no gradient checkpointing; recorded peaks read as {args.peak_unit}; bound [0.95, 1.25]")
    header = (f"{'micro-batch':>12} {'tokens':>7} {'estimate GB':>12} {'measured GB':>12} {'ratio':>6} "
              f"{'old ratio':>9} {'implied tokens':>15} {'ckpt est GB':>12}  bound")
    print(header)
    print("-" * len(header))
    outside = 0
    for row in MEASURED:
        est = estimate_memory(shapes, PHI3_MINI, {**params, "per_device_train_batch_size":
                                                  row["per_device_train_batch_size"],
                                                  "max_seq_length": row["max_seq_length"]},
                              apply_lora=True, lora_target_modules=TARGETS)
        b = est["bytes"]
        measured = row["peak_gb"] * unit
        ratio = b["total"] / measured
        implied = (measured - b["state"]) / est["bytes_per_token"]["without_checkpointing"]
        ok = ratio_bounds_ok(b["total"], measured)
        outside += not ok
        print(f"{row['per_device_train_batch_size']:>4} x {row['max_seq_length']:<5} "
              f"{est['tokens_per_micro_batch']:>7} {b['total'] / GB:>12.2f} {measured / GB:>12.2f} {ratio:>6.3f} "
              f"{row['previous_estimate'] / row['peak_gb']:>9.3f} {implied:>15,.0f} "
              f"{b['total_checkpointed'] / GB:>12.2f}"
              f"  {'ok' if ok else 'OUTSIDE'}")
    terms = estimate_memory(shapes, PHI3_MINI, {**params, "per_device_train_batch_size": 1, "max_seq_length": 1},
                            apply_lora=True, lora_target_modules=TARGETS)["bytes_per_token"]
    print("\nbytes per token: " + ", ".join(f"{k} {v:,.0f}" for k, v in terms["terms"].items() if v))
    print(f"total {terms['without_checkpointing']:,.0f} without checkpointing, {terms['with_checkpointing']:,.0f} "
          "with it")
    print(f"{outside} row(s) outside the bound" if outside else "every row within the bound")
    return 1 if outside else 0


if __name__ == "__main__":
    sys.exit(main())
