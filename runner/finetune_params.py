"""The effective fine-tune parameters of a run, shared by both backends.

Merge order (the notebook's, made explicit):
  1. the composed config's finetune keys (schema defaults, the finetune preset, the experiment's values),
  2. the foundation model's `model_specific_defaults` tag (the notebook applies it on top of its own parameters),
  3. the user's explicit command-line overrides of `finetune.*` (they always win).
Tag keys that are not component inputs (e.g. `learning_rate_min`/`learning_rate_max`) are dropped with a note:
passing them to the component raises an unexpected-keyword error. Tag values are coerced to the schema's types
(the tags mix `precision: 16` ints and `"true"` strings).

The merge runs once per run (`decide_finetune_params`, called through `Backend.finetune_params`): its typed,
frozen result is kept on the StepContext and in the run record, and every later consumer (the compute checks, the
trainer or the job, the register step's fallback, the plan) reads that one decision instead of merging again.
"""

import dataclasses
from types import MappingProxyType
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Set, Tuple

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


RECORD_KEY = "finetune_params"  # where run_record.json keeps the decision (beside `overrides`)
# Where an effective value came from (EffectiveFinetuneParams.sources).
FROM_CONFIG = "config"  # schema default, finetune preset or experiment
FROM_MODEL_DEFAULTS = "model_specific_defaults"  # the foundation model's tag (or model.model_specific_defaults)
FROM_OVERRIDE = "override"  # the user's explicit finetune.<key>=... on the command line


@dataclasses.dataclass(frozen=True)
class EffectiveFinetuneParams:
    """The run's fine-tune parameters as decided once: each component key's value, where it came from, and the
    notes the merge made (what the model's defaults changed, what was dropped, which override won)."""

    values: Mapping[str, Any]
    sources: Mapping[str, str]
    notes: Tuple[str, ...] = ()
    explicit_keys: FrozenSet[str] = frozenset()

    def __post_init__(self):  # read-only views: a consumer that adjusts a value works on its own copy (params())
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))
        object.__setattr__(self, "notes", tuple(self.notes))
        object.__setattr__(self, "explicit_keys", frozenset(self.explicit_keys))

    def params(self) -> Dict[str, Any]:
        """A fresh, mutable copy of the values (what the trainer, the job builder and the plan take)."""
        return dict(self.values)

    def note_list(self) -> List[str]:
        return list(self.notes)

    def to_record(self) -> Dict[str, Any]:
        """As the run record keeps it (`finetune_params` beside `overrides`): plain JSON."""
        return {"values": dict(self.values), "sources": dict(self.sources), "notes": list(self.notes),
                "explicit_keys": sorted(self.explicit_keys)}

    @classmethod
    def from_record(cls, data: Mapping[str, Any]) -> "EffectiveFinetuneParams":
        return cls(values=data["values"], sources=data.get("sources", {}), notes=tuple(data.get("notes", ())),
                   explicit_keys=frozenset(data.get("explicit_keys", ())))


def recorded_decision(record: Any) -> "EffectiveFinetuneParams | None":
    """The decision a run record keeps: this run's, else its from_run record's; None when neither decided."""
    data = record.data.get(RECORD_KEY) or (getattr(record, "earlier", None) or {}).get(RECORD_KEY)
    return EffectiveFinetuneParams.from_record(data) if data else None


def decide_finetune_params(
    finetune_cfg: Mapping[str, Any],
    model_defaults: Mapping[str, Any] | None,
    explicit_keys: Iterable[str] = (),
) -> EffectiveFinetuneParams:
    """The one decision of a run's effective parameters (merge_finetune_params), with each value's source."""
    explicit = frozenset(explicit_keys)
    values, notes = merge_finetune_params(finetune_cfg, model_defaults, explicit)
    from_model = {key for key in (model_defaults or {}) if key in values and key not in explicit}
    sources = {key: FROM_OVERRIDE if key in explicit else FROM_MODEL_DEFAULTS if key in from_model else FROM_CONFIG
               for key in values}
    return EffectiveFinetuneParams(values=values, sources=sources, notes=tuple(notes), explicit_keys=explicit)


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
