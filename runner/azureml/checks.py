"""Checks the notebook makes (and a few it should), each before the call that would spend money.

Every failure is a ConfigError that says what was wrong, which key sets it and what would be right.
"""

import re
from typing import Any, Iterable, List, Optional

from runner.errors import RunnerError
from runner.schema import ConfigError


class AzureStepError(RunnerError):
    """A step that cannot go on for a reason the user can act on (an earlier step missing, a job not completed,
    no capacity for the cluster): printed by ftrun as a message, without a traceback."""


# The notebook's list of GPU sizes the fine-tune components cannot use (K80), checked when a model has no allow list.
UNSUPPORTED_GPU_SIZES = ["standard_nc6", "standard_nc12", "standard_nc24", "standard_nc24r"]

# Managed online endpoint names: 3-32 characters, a letter first, then letters, digits and '-'.
_ENDPOINT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{2,31}$")


def allowed_compute_hint(allow_list: List[str]) -> str:
    """Only presets whose size is in the list (a fixed example such as compute=nd96asr_v4 is wrong for models that
    do not list it, e.g. Phi-3.5-mini-instruct)."""
    from runner.presets import compute_presets_for

    presets = compute_presets_for(allow_list)
    if presets:
        return "Pick an allowed size: compute=" + " | ".join(presets)
    return f"Pick an allowed size: compute.size={allow_list[0]} (no compute preset in conf/compute/ has one)"


def check_finetune_size(size: str, allow_list: List[str], *, model_name: str, where: str = "compute.size") -> None:
    """Case-insensitive, as the notebook compares sizes."""
    allowed = [s.lower() for s in allow_list]
    if allow_list:
        if size.lower() not in allowed:
            raise ConfigError(
                f"{where}={size} is not in {model_name}'s fine-tune compute allow list: "
                f"{', '.join(allow_list)}. {allowed_compute_hint(allow_list)}"
            )
    elif size.lower() in UNSUPPORTED_GPU_SIZES:
        raise ConfigError(
            f"{where}={size} is a K80 size the fine-tune components do not support "
            f"({', '.join(UNSUPPORTED_GPU_SIZES)}); pick a newer GPU size"
        )


def check_inference_size(instance_type: str, allow_list: List[str], *, model_name: str) -> None:
    if allow_list and instance_type.lower() not in [s.lower() for s in allow_list]:
        raise ConfigError(
            f"deployment.instance_type={instance_type} is not in {model_name}'s inference compute allow list: "
            f"{', '.join(allow_list)}"
        )


def check_provisioning(compute: Any, name: str) -> None:
    state = str(getattr(compute, "provisioning_state", "") or "")
    if state.lower() == "failed":
        raise ConfigError(
            f"compute cluster {name!r} is in provisioning state 'failed': delete it in the studio (or "
            f"`az ml compute delete -n {name}`) and rerun, or use another cluster name (compute.name=...)"
        )


def gpus_for_size(sizes: Iterable[Any], size: str) -> Optional[int]:
    """GPUs per node of `size` from compute.list_sizes() (matched case-insensitively), None if not listed."""
    for sku in sizes:
        if str(getattr(sku, "name", "")).lower() == size.lower():
            gpus = getattr(sku, "gpus", None)
            return int(gpus) if gpus is not None else None
    return None


def reconcile_gpus(listed: Optional[int], configured: int, size: str) -> int:
    """The workspace's figure wins when the config leaves it at 0; a different configured figure is an error."""
    if listed is None:
        raise ConfigError(
            f"compute.size={size} is not among the workspace's VM sizes (compute.list_sizes()): check the size "
            f"name and that the workspace's region offers it"
        )
    if listed < 1:
        raise ConfigError(f"compute.size={size} has no GPUs; fine-tuning needs a GPU size")
    if configured and configured != listed:
        raise ConfigError(
            f"compute.gpus_per_node={configured} but {size} has {listed} GPU(s) per node: set "
            f"compute.gpus_per_node={listed} (or 0 to take it from the workspace)"
        )
    return listed


def check_endpoint_name(name: str) -> None:
    if not _ENDPOINT_NAME.match(name):
        raise ConfigError(
            f"endpoint name {name!r} (deployment.endpoint_name_prefix + timestamp) must be 3-32 characters, start "
            f"with a letter and hold only letters, digits and '-': shorten deployment.endpoint_name_prefix"
        )
