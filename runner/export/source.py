"""A registered model's files as the plain transformers folder the export reads.

A registered version is stored as an MLflow model (local: runner/local/registry.py saves the transformers flavor:
weights and config under `model/`, the tokenizer under `components/tokenizer/`), and Azure ML's
`models.download` puts it under `<download path>/<name>/<folder>/...`. Both backends hand the folder they have to
`plain_model_folder`, which finds the weights and the tokenizer wherever that layout put them, so the export itself
never depends on where the model came from.
"""

import shutil
from pathlib import Path
from typing import Optional

from runner.export.errors import ExportError

_TOKENIZER_MARKERS = ("tokenizer_config.json",)
_SKIP = {"MLmodel", "registered_model_meta", "conda.yaml", "python_env.yaml", "requirements.txt", "README.md"}


def _first_dir_with(root: Path, test) -> Optional[Path]:
    for path in sorted([root, *[p for p in root.rglob("*") if p.is_dir()]], key=lambda p: len(p.parts)):
        if test(path):
            return path
    return None


def _is_weights_dir(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def plain_model_folder(root, work_dir) -> Path:
    """root itself when it is already a plain model folder (weights and tokenizer side by side), else a folder in
    work_dir holding the weights folder's files and the tokenizer folder's files (hard links where possible)."""
    root = Path(root)
    if not root.is_dir():
        raise ExportError(f"the registered model's files are not at {root}: register the model again")
    weights = _first_dir_with(root, _is_weights_dir)
    if weights is None:
        raise ExportError(f"the registered model in {root} holds no transformers weights (no folder with "
                          "config.json and *.safetensors): it cannot be exported")
    tokenizer = _first_dir_with(root, lambda p: any((p / m).is_file() for m in _TOKENIZER_MARKERS))
    if tokenizer is None:
        raise ExportError(f"the registered model in {root} holds no tokenizer (no tokenizer_config.json)")
    if tokenizer == weights:
        return weights
    dest = Path(work_dir) / "model"
    dest.mkdir(parents=True, exist_ok=True)
    for folder in (weights, tokenizer):
        for item in folder.iterdir():
            if item.is_file() and item.name not in _SKIP and not (dest / item.name).exists():
                _link_or_copy(item, dest / item.name)
    return dest


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        dest.hardlink_to(src)  # the same bytes, no second copy of the weights on the disk
    except OSError:
        shutil.copy2(src, dest)
