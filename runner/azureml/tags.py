"""What the runner needs to know about a foundation model, from its registry tags or from the model config.

Registry tags are strings: lists and dicts arrive as Python or JSON literals (`"['Standard_NC24ads_A100_v4', ...]"`,
`"{'apply_lora': 'true', ...}"`), sometimes as `OrderedDict([...])`. They are parsed with json / ast.literal_eval
only (never eval). Newer models carry the allow lists in `system_metadata.supportedComputes` and their deprecation
dates in `system_metadata.deprecation`; the model config (conf/model/*.yaml) holds the same facts for offline
planning.
"""

import ast
import datetime as dt
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from runner.schema import ConfigError


class TagError(ConfigError):
    """A model tag that cannot be parsed as the list/dict it should hold."""


@dataclass
class ModelFacts:
    name: str
    version: Optional[str]
    asset_id: str  # what mlflow_model_path gets (the registry asset id)
    finetune_allow_list: List[str] = field(default_factory=list)
    inference_allow_list: List[str] = field(default_factory=list)
    model_specific_defaults: Dict[str, Any] = field(default_factory=dict)
    archived: bool = False
    archived_because: List[str] = field(default_factory=list)
    finetune_retirement_date: Optional[str] = None
    inference_retirement_date: Optional[str] = None
    source: str = "registry"  # "registry" or "config"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


_ORDERED = re.compile(r"^\s*(?:collections\.)?ordereddict\((.*)\)\s*$", re.IGNORECASE | re.DOTALL)


def _literal(text: str, key: str) -> Any:
    text = text.strip()
    try:
        return json.loads(text)
    except ValueError:
        pass
    m = _ORDERED.match(text)
    if m:  # OrderedDict([('a', 1), ...]) -> the pairs, turned into a dict below
        inner = m.group(1).strip() or "[]"
        try:
            return dict(ast.literal_eval(inner))
        except (ValueError, SyntaxError, TypeError) as exc:
            raise TagError(f"model tag {key}: cannot parse {text[:120]!r}: {exc}") from exc
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError) as exc:
        raise TagError(f"model tag {key}: cannot parse {text[:120]!r} as a literal: {exc}") from exc


def parse_list_tag(value: Any, key: str) -> List[str]:
    """A list of strings from a list, a JSON/Python list literal, or a comma-separated string."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text[0] in "[(":
            parsed = _literal(text, key)
            if not isinstance(parsed, (list, tuple)):
                raise TagError(f"model tag {key}: expected a list, got {type(parsed).__name__}")
            return [str(v) for v in parsed]
        return [part.strip().strip("'\"") for part in text.split(",") if part.strip()]
    raise TagError(f"model tag {key}: expected a list of SKU names, got {type(value).__name__}")


def parse_dict_tag(value: Any, key: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, str):
        if not value.strip():
            return {}
        parsed = _literal(value, key)
        if not isinstance(parsed, Mapping):
            raise TagError(f"model tag {key}: expected a mapping, got {type(parsed).__name__}")
        return dict(parsed)
    raise TagError(f"model tag {key}: expected a mapping, got {type(value).__name__}")


def _date(value: Any) -> Optional[str]:
    """'2025-08-30T00:00:00.000000Z' -> '2025-08-30'."""
    if not value:
        return None
    return str(value)[:10]


def _get(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, Mapping):
            return None
        mapping = mapping.get(key)
    return mapping


def _retired(date: Optional[str], today: dt.date) -> bool:
    if not date:
        return False
    try:
        return dt.date.fromisoformat(date) <= today
    except ValueError:
        return False


def registry_asset_id(registry: str, name: str, version: Optional[str], label: Optional[str]) -> str:
    if version:
        return f"azureml://registries/{registry}/models/{name}/versions/{version}"
    return f"azureml://registries/{registry}/models/{name}/labels/{label or 'latest'}"


def facts_from_registry(model: Any, model_cfg: Any, today: Optional[dt.date] = None) -> ModelFacts:
    """Facts from a registry Model entity (tags, stage, system metadata); the config's archived flag counts too."""
    today = today or dt.date.today()
    tags = dict(getattr(model, "tags", None) or {})
    meta = getattr(model, "_system_metadata", None) or getattr(model, "system_metadata", None) or {}
    if isinstance(meta, str):
        meta = parse_dict_tag(meta, "system_metadata")
    supported = _get(meta, "supportedComputes") or {}

    finetune = parse_list_tag(tags.get("finetune_compute_allow_list"), "finetune_compute_allow_list")
    if not finetune:
        finetune = parse_list_tag(supported.get("finetuneComputes"), "system_metadata.supportedComputes")
    inference = parse_list_tag(tags.get("inference_compute_allow_list"), "inference_compute_allow_list")
    if not inference:
        inference = parse_list_tag(supported.get("inferenceComputes"), "system_metadata.supportedComputes")

    deprecation = _get(meta, "deprecation") or {}
    ft_retire = _date(deprecation.get("finetuneRetirementDate")) or model_cfg.finetune_retirement_date
    inf_retire = _date(deprecation.get("inferenceRetirementDate")) or model_cfg.inference_retirement_date

    because = []
    if str(getattr(model, "stage", "") or "").lower() == "archived":
        because.append("registry stage Archived")
    if str(tags.get("isArchived", "")).lower() == "true" or _get(meta, "isArchived") is True:
        because.append("registry isArchived")
    if _retired(ft_retire, today):
        because.append(f"fine-tuning retired on {ft_retire}")
    if model_cfg.archived and not because:
        because.append("model config archived=true")

    return ModelFacts(
        name=str(getattr(model, "name", model_cfg.name)),
        version=str(getattr(model, "version", "") or "") or None,
        asset_id=str(getattr(model, "id", "") or registry_asset_id(
            model_cfg.registry, model_cfg.name, getattr(model, "version", None), model_cfg.label)),
        finetune_allow_list=finetune,
        inference_allow_list=inference,
        model_specific_defaults=parse_dict_tag(tags.get("model_specific_defaults"), "model_specific_defaults"),
        archived=bool(because),
        archived_because=because,
        finetune_retirement_date=ft_retire,
        inference_retirement_date=inf_retire,
        source="registry",
    )


def facts_from_config(model_cfg: Any, today: Optional[dt.date] = None) -> ModelFacts:
    """Facts for offline planning: the tags copied into conf/model/<preset>.yaml."""
    from omegaconf import OmegaConf

    today = today or dt.date.today()
    because = []
    if model_cfg.archived:
        because.append("model config archived=true")
    if _retired(model_cfg.finetune_retirement_date, today):
        because.append(f"fine-tuning retired on {model_cfg.finetune_retirement_date}")
    defaults = model_cfg.model_specific_defaults
    return ModelFacts(
        name=model_cfg.name,
        version=model_cfg.version,
        asset_id=registry_asset_id(model_cfg.registry, model_cfg.name, model_cfg.version, model_cfg.label),
        finetune_allow_list=[str(s) for s in model_cfg.finetune_compute_allow_list],
        inference_allow_list=[str(s) for s in model_cfg.inference_compute_allow_list],
        model_specific_defaults=OmegaConf.to_container(defaults, resolve=True) if OmegaConf.is_config(defaults)
        else dict(defaults or {}),
        archived=bool(because),
        archived_because=because,
        finetune_retirement_date=model_cfg.finetune_retirement_date,
        inference_retirement_date=model_cfg.inference_retirement_date,
        source="config",
    )


def archived_message(facts: ModelFacts, model_cfg: Any) -> str:
    when = f", fine-tuning retired {facts.finetune_retirement_date}" if facts.finetune_retirement_date else ""
    why = "; ".join(facts.archived_because)
    switch = (f" Switch to a current model with `model={model_cfg.replacement_config}`"
              if model_cfg.replacement_config else " Choose a current model with `model=<preset>`")
    return (f"model {facts.name} is archived{when} ({why}).{switch}, or set model.allow_archived=true to "
            f"go ahead anyway.")
