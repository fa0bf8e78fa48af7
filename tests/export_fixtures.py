"""Shared pieces of the export tests: the pinned llama-cpp-python sdist (llama.cpp's converter and its vocab-only
GGUFs), a trained tiny model and held-out chats."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runner.export.converter import PIN, sha256_of


def locate_sdist(cache_dir: Path) -> Path:
    """$LLAMA_CPP_SDIST, else the pinned sdist downloaded once with pip into pytest's cache (the package registry
    is the only network the tests use)."""
    given = os.environ.get("LLAMA_CPP_SDIST")
    if given:
        path = Path(given)
        return path / PIN["sdist"] if path.is_dir() else path
    target = cache_dir / PIN["sdist"]
    if not target.is_file() or sha256_of(target) != PIN["sha256"]:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                               "--dest", str(cache_dir), f"{PIN['package']}=={PIN['version']}"],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not target.is_file():
            pytest.skip(f"the package registry did not give {PIN['sdist']}: {proc.stderr.strip()[-300:]}")
    return target


def held_out_chats(n: int, seed: int = 0):
    """Chats of the sample's test split, each ending in an assistant turn, with a system turn added to half."""
    from runner.data.sample import generate_rows

    chats = []
    for i, row in enumerate(generate_rows(n, seed, "test_sft")):
        messages = [m for m in row["messages"] if m["role"] in ("system", "user", "assistant")]
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()
        if i % 2 and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": "You answer briefly."}, *messages]
        chats.append(messages)
    return chats


def write_rows(folder: Path, n_train: int, n_eval: int, seed: int = 0):
    from runner.data.sample import generate_rows

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, n in (("train_sft", n_train), ("test_sft", n_eval)):
        paths[split] = folder / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in generate_rows(n, seed + 1, split)),
                                encoding="utf-8")
    return paths
