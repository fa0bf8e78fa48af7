"""The dataset's slug: one short name, derived from what the data is, for the folder its splits are written to
(`dataset.download_dir`) and for the registered model (`mlflow.registered_model_name`).

    HuggingFaceH4/ultrachat_200k -> ultrachat_200k   (folder .ftrun/data/ultrachat_200k, model <model>-ultrachat-200k)
    sample                       -> sample
    /home/me/support_chats.jsonl -> support_chats    (a file: its stem; a folder: its name)

Registered as OmegaConf resolvers when runner.schema is imported, so `${ftrun_slug:${dataset.name}}` works in every
preset and on the command line. Slugs hold only letters, digits, '-', '_' and '.', the characters MLflow and Azure
ML allow in model names; a model name joins the model and the slug with '-' and writes the slug's '_' as '-', as
the notebook named its model (Phi-3-mini-4k-instruct-ultrachat-200k).
"""

import re
from pathlib import PurePath
from typing import Any

DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
_OUTSIDE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_MODEL_NAME = 255  # Azure ML model names: 1-255 characters


def dataset_slug(name: Any) -> str:
    """The last component of a hub id or path, without a data-file suffix, reduced to [A-Za-z0-9._-]."""
    text = "" if name is None else str(name).strip().rstrip("/\\")
    stem = PurePath(text.replace("\\", "/")).name if text else ""
    for suffix in DATA_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    slug = _OUTSIDE.sub("-", stem).strip("-_.")
    return slug or "local"


def model_name(base: Any, slug: Any) -> str:
    """`<base>-<slug>`: the registered model's name (MLflow and Azure ML both accept it)."""
    name = f"{_OUTSIDE.sub('-', str(base)).strip('-_.')}-{dataset_slug(slug).replace('_', '-')}"
    return name[:MAX_MODEL_NAME]


def register_name_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("ftrun_slug", dataset_slug, replace=True)
    OmegaConf.register_new_resolver("ftrun_model_name", model_name, replace=True)
