#!/usr/bin/env python
"""Download the first N percent of each split of a chat dataset as JSONL (the notebook's download-dataset.py).

    python scripts/download_dataset.py --dataset HuggingFaceH4/ultrachat_200k --download-dir ultrachat_200k_dataset \
        --split-percent 5
    python scripts/download_dataset.py --dataset ./my_chats --splits train_sft test_sft --split-percent 100

Writes <download-dir>/<split>.jsonl (atomically) and manifest.json; a repeated request is answered from the
manifest unless --force. Every row is then validated (--on-invalid error|skip). The same code is the workflow's
data step (`ftrun steps=[data] dataset=ultrachat_200k`).
"""

import argparse
import sys

from runner.data.download import download_splits
from runner.data.step import validate_splits
from runner.errors import RunnerError

SPLITS = ["train_sft", "test_sft", "train_gen", "test_gen"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="HuggingFaceH4/ultrachat_200k", help="hub id, or a local folder/file")
    parser.add_argument("--subset", default=None, help="dataset configuration name, if any")
    parser.add_argument("--split-percent", type=float, default=5.0, help="first N percent of each split (0, 100]")
    parser.add_argument("--download-dir", default="ultrachat_200k_dataset")
    parser.add_argument("--splits", nargs="+", default=SPLITS)
    parser.add_argument("--force", action="store_true", help="download again even if the manifest matches")
    parser.add_argument("--on-invalid", choices=["error", "skip"], default="error")
    args = parser.parse_args(argv)
    try:
        manifest = download_splits(args.dataset, args.splits, args.split_percent, args.download_dir,
                                   subset=args.subset, force=args.force)
        files = {split: info["file"] for split, info in manifest["splits"].items()}
        reports = validate_splits(args.download_dir, files, args.on_invalid, manifest)
        for split, report in reports.items():
            dropped = f", {report['rejected']} dropped -> {report['rejects_file']}" if report["rejected"] else ""
            print(f"{split}: {report['valid']} valid rows{dropped}" + (" (cached)" if manifest.get("cached") else ""))
    except RunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
