"""What the runner needs to know about a foundation model, from its registry tags or from the model config.

Registry tags are strings: lists and dicts arrive as Python or JSON literals (`"['Standard_NC24ads_A100_v4', ...]"`,
`"{'apply_lora': 'true', ...}"`), sometimes as `OrderedDict([...])`. They are parsed with json / ast.literal_eval
only (never eval).

Where a registry model keeps its SKU allow lists depends on its age: the oldest in tags
(`finetune_compute_allow_list`), older ones in properties (`finetune-recommended-sku`, a comma-separated string),
current ones in the system metadata (`SKU.finetuneRecommendedSkus`, `supportedComputes.finetuneComputes`), with the
deprecation dates (`deprecation.finetuneRetirementDate`). azure-ai-ml (1.35) builds a registry Model without its
system metadata (and isArchived), so the model step hands in the version's raw REST body
(runner/azureml/registry_rest.py) to read them from; only without it do the lists and dates come from the model
preset (conf/model/*.yaml), and only when the preset's facts are this model's (`model.facts_for`).
`ModelFacts.allow_list_source` says where each list came from.
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
    # where each allow list came from: {"finetune": ..., "inference": ...}, e.g. "registry tags
    # (finetune_compute_allow_list)", "registry properties (finetune-recommended-sku)", "registry system metadata
    # (SKU.finetuneRecommendedSkus)", "model preset (model.finetune_compute_allow_list)" or "none"
    allow_list_source: Dict[str, str] = field(default_factory=dict)

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


def preset_facts_apply(model_cfg: Any, name: Optional[str] = None) -> bool:
    """Whether the model preset's registry facts (lists, dates, archived, defaults, latest_version) are those of
    model `name` (default model.name): `model=phi4 model.name=Phi-4-mini-instruct` keeps Phi-4's facts in the
    config, and they must not be applied to another model."""
    owner = getattr(model_cfg, "facts_for", None) or model_cfg.name
    return str(owner) == str(name or model_cfg.name)


def registry_asset_id(registry: str, name: str, version: Optional[str], label: Optional[str]) -> str:
    if version:
        return f"azureml://registries/{registry}/models/{name}/versions/{version}"
    return f"azureml://registries/{registry}/models/{name}/labels/{label or 'latest'}"


# Where a registry model may keep each allow list, in the order they are read: (where, key path).
_LIST_PLACES = {
    "finetune": (("tags", "finetune_compute_allow_list"), ("properties", "finetune-recommended-sku"),
                 ("system metadata", "SKU.finetuneRecommendedSkus"),
                 ("system metadata", "supportedComputes.finetuneComputes")),
    "inference": (("tags", "inference_compute_allow_list"), ("properties", "inference-recommended-sku"),
                  ("system metadata", "SKU.inferenceRecommendedSkus"),
                  ("system metadata", "supportedComputes.inferenceComputes")),
}
_PRESET_KEYS = {"finetune": "finetune_compute_allow_list", "inference": "inference_compute_allow_list"}


def system_metadata(model: Any) -> Dict[str, Any]:
    """The model's system metadata if the entity kept it (azure-ai-ml 1.35 does not for registry models)."""
    meta = getattr(model, "_system_metadata", None) or getattr(model, "system_metadata", None) or {}
    if isinstance(meta, str):
        meta = parse_dict_tag(meta, "system_metadata")
    return dict(meta) if isinstance(meta, Mapping) else {}


def _allow_list(kind: str, places: Dict[str, Mapping], model_cfg: Any, preset_applies: bool = True,
                meta_where: str = "system metadata") -> tuple[List[str], str]:
    """The first non-empty list among the registry's places, else the model preset's (only when its facts are this
    model's); with where it came from."""
    for where, key in _LIST_PLACES[kind]:
        value = _get(places[where], *key.split(".")) if where == "system metadata" else places[where].get(key)
        found = parse_list_tag(value, f"{where} {key}") if value is not None else []
        if found:
            return found, f"registry {meta_where if where == 'system metadata' else where} ({key})"
    preset_key = _PRESET_KEYS[kind]
    preset = [str(s) for s in (getattr(model_cfg, preset_key, None) or [])]
    if preset and not preset_applies:
        return [], (f"none (the model preset's model.{preset_key} is {getattr(model_cfg, 'facts_for', None)}'s, "
                    f"not this model's)")
    if preset:
        return preset, f"model preset (model.{preset_key})"
    return [], "none"


def facts_from_registry(model: Any, model_cfg: Any, today: Optional[dt.date] = None,
                        rest_body: Optional[Mapping[str, Any]] = None) -> ModelFacts:
    """Facts from a registry Model entity (tags, properties, stage, system metadata if kept); what the registry does
    not show (the allow lists and dates of current models, whose system metadata the SDK drops) from the model
    preset. The config's archived flag counts too."""
    today = today or dt.date.today()
    tags = dict(getattr(model, "tags", None) or {})
    properties = dict(getattr(model, "properties", None) or {})
    meta = system_metadata(model)
    meta_where = "system metadata"
    raw = dict((rest_body or {}).get("properties") or {})
    if not meta and raw.get("systemMetadata"):  # what the SDK's entity drops, from the registry's own REST body
        meta, meta_where = dict(raw["systemMetadata"]), "REST body system metadata"
    places = {"tags": tags, "properties": properties, "system metadata": meta}
    applies = preset_facts_apply(model_cfg, str(getattr(model, "name", None) or model_cfg.name))
    finetune, finetune_source = _allow_list("finetune", places, model_cfg, applies, meta_where)
    inference, inference_source = _allow_list("inference", places, model_cfg, applies, meta_where)

    deprecation = _get(meta, "deprecation") or {}
    ft_retire = _date(deprecation.get("finetuneRetirementDate")) or (
        model_cfg.finetune_retirement_date if applies else None)
    inf_retire = _date(deprecation.get("inferenceRetirementDate")) or (
        model_cfg.inference_retirement_date if applies else None)

    because = []
    if str(getattr(model, "stage", "") or "").lower() == "archived":
        because.append("registry stage Archived")
    if str(tags.get("isArchived", "")).lower() == "true" or _get(meta, "isArchived") is True:
        because.append("registry isArchived")
    elif raw.get("isArchived") is True:  # the version's own flag, kept only in the REST body
        because.append("registry isArchived (REST body)")
    if _retired(ft_retire, today):
        because.append(f"fine-tuning retired on {ft_retire}")
    if applies and model_cfg.archived and not because:
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
        allow_list_source={"finetune": finetune_source, "inference": inference_source},
    )


def facts_from_config(model_cfg: Any, today: Optional[dt.date] = None) -> ModelFacts:
    """Facts for offline planning: the tags copied into conf/model/<preset>.yaml."""
    from omegaconf import OmegaConf

    today = today or dt.date.today()
    if not preset_facts_apply(model_cfg):  # the preset's facts are another model's
        return ModelFacts(name=model_cfg.name, version=model_cfg.version,
                          asset_id=registry_asset_id(model_cfg.registry, model_cfg.name, model_cfg.version,
                                                     model_cfg.label),
                          source="config", allow_list_source={"finetune": "none", "inference": "none"})
    because = []
    if model_cfg.archived:
        because.append("model config archived=true")
    if _retired(model_cfg.finetune_retirement_date, today):
        because.append(f"fine-tuning retired on {model_cfg.finetune_retirement_date}")
    defaults = model_cfg.model_specific_defaults
    version = model_cfg.version or (getattr(model_cfg, "latest_version", None) if model_cfg.label == "latest" else None)
    return ModelFacts(
        name=model_cfg.name,
        version=version,
        asset_id=registry_asset_id(model_cfg.registry, model_cfg.name, version, model_cfg.label),
        finetune_allow_list=[str(s) for s in model_cfg.finetune_compute_allow_list],
        inference_allow_list=[str(s) for s in model_cfg.inference_compute_allow_list],
        model_specific_defaults=OmegaConf.to_container(defaults, resolve=True) if OmegaConf.is_config(defaults)
        else dict(defaults or {}),
        archived=bool(because),
        archived_because=because,
        finetune_retirement_date=model_cfg.finetune_retirement_date,
        inference_retirement_date=model_cfg.inference_retirement_date,
        source="config",
        allow_list_source={"finetune": "model preset (model.finetune_compute_allow_list)",
                           "inference": "model preset (model.inference_compute_allow_list)"},
    )


def allow_list_message(facts: ModelFacts, planned: bool = False) -> str:
    """One line saying where the allow lists were read from, and what a fallback to the preset means."""
    sources = facts.allow_list_source or {}
    parts = []
    for kind, label in (("finetune", "fine-tune"), ("inference", "inference")):
        source = sources.get(kind, "unknown")
        count = len(facts.finetune_allow_list if kind == "finetune" else facts.inference_allow_list)
        parts.append(f"{label} from {source}" + (f", {count} sizes" if count else ""))
    text = f"allow lists of {facts.name}: " + "; ".join(parts)
    fallback = [s for s in sources.values() if s.startswith("model preset") or s.startswith("none")]
    if planned:
        text += " (a dry run answers the registry model from the model preset)"
    elif facts.source == "registry" and fallback:
        text += (" (the registry model shows no list in its tags, properties or system metadata: "
                 + ("the model preset's list is used" if any(s.startswith("model preset") for s in fallback)
                    else "only K80 sizes are refused") + ")")
    return text
