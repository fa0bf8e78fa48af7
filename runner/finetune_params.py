"""The effective fine-tune parameters of a run, shared by both backends.

Merge order (the notebook's, made explicit):
  1. the composed config's finetune keys (schema defaults, the finetune preset, the experiment's values),
  2. the foundation model's `model_specific_defaults` tag (the notebook applies it on top of its own parameters),
  3. the user's explicit command-line overrides of `finetune.*` (they always win).
Tag keys that are not component inputs (e.g. `learning_rate_min`/`learning_rate_max`) are dropped with a note:
passing them to the component raises an unexpected-keyword error. Tag values are coerced to the schema's types
(the tags mix `precision: 16` ints and `"true"` strings).
"""

import dataclasses
from typing import Any, Dict, Iterable, List, Mapping, Set, Tuple

from runner.schema import RUNNER_FINETUNE_KEYS, FinetuneConfig

# Keys of FinetuneConfig that the runner reads itself and never sends to the component.
RUNNER_KEYS = RUNNER_FINETUNE_KEYS
# The keys of FinetuneConfig that are chat_completion_pipeline inputs (everything but the runner's own).
COMPONENT_KEYS = [f.name for f in dataclasses.fields(FinetuneConfig) if f.name not in RUNNER_KEYS]
_TYPES = {f.name: f.type for f in dataclasses.fields(FinetuneConfig)}


def explicit_finetune_keys(task_overrides: Iterable[str]) -> Set[str]:
    """`finetune.<key>` names set on the command line (also `+`/`++` forms); group choices are not keys."""
    keys = set()
    for override in task_overrides:
        name = override.split("=", 1)[0].lstrip("+~")
        if name.startswith("finetune.") and "=" in override:
            keys.add(name[len("finetune."):])
    return keys


def coerce(key: str, value: Any) -> Any:
    """A tag value in the schema's Python type ("true" -> True, "16" -> 16, "5e-6" -> 5e-06)."""
    typ = _TYPES.get(key)
    if isinstance(value, str):
        text = value.strip()
        if typ is bool:
            if text.lower() in ("true", "false"):
                return text.lower() == "true"
            raise ValueError(f"{key}={value!r} is not a boolean ('true' or 'false')")
        if typ is int:
            return int(float(text)) if text.lstrip("-").replace(".", "", 1).isdigit() else int(text)
        if typ is float:
            return float(text)
        return value
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is str and not isinstance(value, str):
        return str(value)
    return value


def config_params(finetune_cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The component keys of the composed finetune config as plain Python values."""
    return {k: finetune_cfg[k] for k in COMPONENT_KEYS}


def merge_finetune_params(
    finetune_cfg: Mapping[str, Any],
    model_defaults: Mapping[str, Any] | None,
    explicit_keys: Iterable[str] = (),
) -> Tuple[Dict[str, Any], List[str]]:
    """Effective parameters and notes on what the model's defaults changed or what was dropped."""
    params = config_params(finetune_cfg)
    notes: List[str] = []
    explicit = set(explicit_keys)
    for key, raw in (model_defaults or {}).items():
        if key not in _TYPES or key in RUNNER_FINETUNE_KEYS:
            notes.append(f"model_specific_defaults.{key}={raw!r} dropped: not an input of the component")
            continue
        value = coerce(key, raw)
        if key in explicit:
            notes.append(f"{key}: your override {params[key]!r} wins over the model's default {value!r}")
            continue
        if params[key] != value:
            notes.append(f"{key}: {params[key]!r} -> {value!r} (model_specific_defaults)")
            params[key] = value
    return params, notes


def effective_batch_size(params: Mapping[str, Any], gpus_per_node: int) -> int:
    return (
        int(params.get("per_device_train_batch_size", 1))
        * int(params.get("gradient_accumulation_steps", 1))
        * max(int(gpus_per_node), 1)
        * int(params.get("num_nodes_finetune", 1))
    )


def dataset_label(dataset_name: Any) -> str:
    """What a run name says about its data: the notebook's "ultrachat" for ultrachat_200k (so its runs keep the
    notebook's names), otherwise the dataset's slug ("sample", the file's stem, ...): a run on the offline sample
    must not be recorded as an ultrachat run."""
    from runner.data.names import dataset_slug

    slug = dataset_slug(dataset_name)
    return "ultrachat" if slug.lower().startswith("ultrachat") else slug


def pipeline_display_name(model_name: str, params: Mapping[str, Any], gpus_per_node: int,
                          dataset: str = "ultrachat") -> str:
    """The notebook's get_pipeline_display_name(), from the effective parameters and the data used
    (`dataset_label`)."""
    ds = f"ds{params.get('deepspeed_stage', 2)}" if params.get("apply_deepspeed") else "nods"
    lora = "lora" if params.get("apply_lora") else "nolora"
    return (
        f"{model_name}-{dataset}-bs{effective_batch_size(params, gpus_per_node)}"
        f"-{params.get('lr_scheduler_type', 'linear')}-{ds}-{lora}"
        f"-save_limit{params.get('save_total_limit', -1)}-seqlen{params.get('max_seq_length', -1)}"
    )
