#!/usr/bin/env python
"""Write the offline sample dataset (synthetic conversations in the ultrachat_200k schema), no network needed.

    python scripts/make_sample_dataset.py --download-dir sample_dataset --seed 42 --rows 480 64 64 32
"""

import argparse
import sys

from runner.data.sample import write_sample_dataset

SPLITS = ["train_sft", "test_sft", "train_gen", "test_gen"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--download-dir", default="sample_dataset")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--rows", type=int, nargs=4, default=[480, 64, 64, 32], metavar=("TRAIN_SFT", "TEST_SFT",
                                                                                         "TRAIN_GEN", "TEST_GEN"))
    args = parser.parse_args(argv)
    manifest = write_sample_dataset(args.download_dir, dict(zip(SPLITS, args.rows)), args.seed)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['rows']} rows -> {info['file']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
