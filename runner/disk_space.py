"""Free-space checks before large writes whose size is known (checkpoints, merged weights): refused up front with
both figures, rather than a `No space left on device` half way through a multi-GB file."""

import shutil
from pathlib import Path

from runner.errors import RunnerError

MARGIN = 1.10  # safetensors headers, tokenizer files, optimizer extras: what a size from the tensors alone misses


class NotEnoughSpace(RunnerError):
    pass


def folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def free_bytes(folder) -> int:
    folder = Path(folder)
    for candidate in [folder, *folder.parents]:
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


def ensure_free(folder, needed_bytes: int, what: str) -> None:
    """Raise NotEnoughSpace naming the folder, the bytes needed and the bytes free."""
    needed = int(needed_bytes * MARGIN)
    free = free_bytes(folder)
    if free < needed:
        raise NotEnoughSpace(f"not enough disk space for {what} in {folder}: it needs about {needed / 1e9:.2f} GB, "
                             f"{free / 1e9:.2f} GB are free. Free space there (old checkpoints, merged models) or "
                             "point paths.root at a larger disk, then run again.")


def tensor_bytes(model) -> int:
    """The bytes of a model's parameters and buffers as saved (each tensor in its own dtype)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params + sum(b.numel() * b.element_size() for b in model.buffers())


def checkpoint_bytes(model, output_dir) -> int:
    """A checkpoint's size: the newest earlier checkpoint's when there is one (the same model writes the same
    size), else the trainable weights plus Adam's two fp32 moments, plus all weights when everything trains."""
    earlier = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: p.stat().st_mtime)
    if earlier:
        return folder_bytes(earlier[-1])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    weights = tensor_bytes(model) if trainable == total else trainable * 4
    return weights + trainable * 8
