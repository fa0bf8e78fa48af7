"""Retired Azure VM sizes, refused at config validation (before any call to Azure), naming the series' retirement date
and a replacement. The table is project data, runner/azureml/data/retired_skus.yaml, with its sources.

Light: no azure import (runs in `ftrun --cfg job` and plan validation); below the schema's validate() and the
azureml backend, which both ask it."""

from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional

DATA = Path(__file__).resolve().parent / "azureml" / "data" / "retired_skus.yaml"


class RetiredSku(NamedTuple):
    size: str
    series: str
    retired: str
    replacement: str
    source: str


@lru_cache(maxsize=1)
def retired_table() -> Dict[str, RetiredSku]:
    """size (lower case) → its retirement facts."""
    import yaml

    table = {}
    for series in yaml.safe_load(DATA.read_text(encoding="utf-8"))["series"]:
        for size, replacement in series["sizes"].items():
            table[size.lower()] = RetiredSku(size, series["name"], str(series["retired"]), replacement,
                                             series["source"])
    return table


def retired(size: Optional[str]) -> Optional[RetiredSku]:
    return retired_table().get(str(size or "").lower())


def retired_message(key: str, size: str) -> Optional[str]:
    found = retired(size)
    if not found:
        return None
    return (f"{key}={size} is retired: Azure retired the {found.series} series on {found.retired} ({found.source}); "
            f"use a current size, e.g. {key}={found.replacement}")


def retired_sku_errors(cfg: Any) -> List[str]:
    """Each size the config would ask Azure for that belongs to a retired series."""
    errors = []
    c, d = cfg.compute, cfg.deployment
    if c.kind != "serverless":
        for size in list(c.get("instance_types") or []) or [c.size]:
            key = "compute.instance_types" if c.get("instance_types") else "compute.size"
            errors.append(retired_message(key, size))
    if d.kind != "serverless" and d.get("instance_type"):
        errors.append(retired_message("deployment.instance_type", d.instance_type))
    return [e for e in errors if e]
