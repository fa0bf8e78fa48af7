"""What to suggest when the chosen model cannot be fine-tuned (archived, or its fine-tuning retired).

A suggestion is a shipped model preset (conf/model/*.yaml) plus the overrides that make the refused run pass every
check the model step makes: the model is not archived or retired, the cluster size is in its fine-tune allow list
(else a compute preset whose size is), and the endpoint size is in its inference allow list (else a listed size).
Nothing is suggested that would itself be refused.

In a real run the registry has the last word: `registry_finetune_models` lists the registry's non-archived models
that declare fine-tuning for the task (chat-completion), from what azure-ai-ml 1.35 keeps of a registry model:
`stage`, `tags` and `properties` (`finetuning-tasks`, `finetune-recommended-sku`, ...). Its system metadata
(`tasks.fineTuningTasks`, `SKU.*`) is read when the entity has it, but the SDK drops it for registry models; the
preset's allow lists stand in then, as in the model step (runner/azureml/tags.py).
"""

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional

from runner.azureml.tags import ModelFacts, facts_from_config, facts_from_registry, parse_list_tag, system_metadata

TASK = "chat-completion"


@dataclass
class RegistryModel:
    """A current registry model that declares fine-tuning for the task."""

    name: str
    version: Optional[str]
    finetune_tasks: List[str]
    finetune_allow_list: List[str] = field(default_factory=list)
    inference_allow_list: List[str] = field(default_factory=list)


@dataclass
class Suggestion:
    """A model preset and what to add to the refused command line so that the run passes the checks."""

    preset: str
    model_name: str
    overrides: List[str]

    @property
    def command(self) -> str:
        return " ".join(self.overrides)


# ---- the registry ------------------------------------------------------------------------------------------------


def _split(value: Any) -> List[str]:
    """A task list from a list, a literal, or a comma-separated string ("chat-completion,text-generation")."""
    return [t.strip().lower() for t in parse_list_tag(value, "finetuning-tasks") if t.strip()]


def model_task(model: Any) -> Optional[str]:
    """The model's (inference) task: tag `task`, else the MLflow flavor's `task_type` (hftransformersv2)."""
    tags = dict(getattr(model, "tags", None) or {})
    if tags.get("task"):
        return str(tags["task"]).strip().lower()
    for flavor in (getattr(model, "flavors", None) or {}).values():
        if isinstance(flavor, Mapping) and flavor.get("task_type"):
            return str(flavor["task_type"]).strip().lower()
    return None


def finetune_tasks(model: Any) -> List[str]:
    """The tasks a registry model declares it can be fine-tuned for.

    Read, in order: properties `finetuning-tasks` (what the model catalog shows as "Finetuning-tasks"), tags of
    that name, system metadata `tasks.fineTuningTasks` (if the entity kept it). Current models such as Phi-4 declare
    theirs only in system metadata, which azure-ai-ml drops; for them a fine-tuning tag (model_specific_defaults,
    finetune_compute_allow_list) or property (finetune-recommended-sku) says the model is fine-tunable, for its own
    task (model_task)."""
    properties = dict(getattr(model, "properties", None) or {})
    tags = dict(getattr(model, "tags", None) or {})
    for source in (properties, tags):
        for key in ("finetuning-tasks", "finetuning_tasks", "finetuningTasks"):
            if source.get(key):
                return _split(source[key])
    tasks = system_metadata(model).get("tasks")
    if isinstance(tasks, Mapping) and tasks.get("fineTuningTasks"):
        return _split(tasks["fineTuningTasks"])
    fine_tunable = (tags.get("model_specific_defaults") or tags.get("finetune_compute_allow_list")
                    or properties.get("finetune-recommended-sku"))
    task = model_task(model)
    return [task] if fine_tunable and task else []


def is_archived(model: Any) -> bool:
    """Archived as far as the SDK's entity tells: stage Archived, or an isArchived tag/property."""
    if str(getattr(model, "stage", "") or "").lower() == "archived":
        return True
    for source in (getattr(model, "tags", None) or {}, getattr(model, "properties", None) or {}):
        if str(source.get("isArchived", source.get("is_archived", ""))).lower() == "true":
            return True
    return False


def _is_container(entry: Any) -> bool:
    """`models.list()` without a name yields containers: name and latest_version only, no tags or properties."""
    return getattr(entry, "version", None) is None and not (getattr(entry, "tags", None)
                                                            or getattr(entry, "properties", None))


def registry_finetune_models(models: Any, *, task: str = TASK, names: Optional[Iterable[str]] = None,
                             max_lookups: int = 20) -> List[RegistryModel]:
    """The registry's non-archived models that declare fine-tuning for `task`.

    `models` is the registry MLClient's `.models` (azure.ai.ml.operations.ModelOperations). `models.list()` lists
    active models only (archived ones are left out by the service); an entry without tags or properties (a
    container) is looked up with `models.get(name, label="latest")`. `names` limits the look-ups (and the result)
    to those models, e.g. the presets'; at most `max_lookups` look-ups are made. A model that cannot be read is
    left out."""
    from azure.core.exceptions import HttpResponseError

    from runner.schema import ModelConfig

    wanted = set(names) if names is not None else None
    found: List[RegistryModel] = []
    lookups = 0
    for entry in models.list():
        name = str(getattr(entry, "name", "") or "")
        if not name or (wanted is not None and name not in wanted):
            continue
        model = entry
        if _is_container(entry):
            if lookups >= max_lookups:
                continue
            lookups += 1
            try:
                model = models.get(name=name, label="latest")
            except HttpResponseError:
                continue
        tasks = finetune_tasks(model)
        if is_archived(model) or task.lower() not in tasks:
            continue
        facts = facts_from_registry(model, ModelConfig(name=name))  # no preset lists: only the registry's
        found.append(RegistryModel(name=name, version=str(getattr(model, "version", "") or "") or None,
                                   finetune_tasks=tasks, finetune_allow_list=facts.finetune_allow_list,
                                   inference_allow_list=facts.inference_allow_list))
    return found


# ---- the presets -------------------------------------------------------------------------------------------------


def model_presets() -> Dict[str, Any]:
    """conf/model/*.yaml by preset name, each merged onto the schema's defaults (ModelConfig)."""
    from omegaconf import OmegaConf

    from runner.presets import group_presets
    from runner.schema import ModelConfig

    return {name: OmegaConf.merge(OmegaConf.structured(ModelConfig), node)
            for name, node in group_presets("model").items()}


def _size_passes(size: str, allow_list: List[str], model_name: str) -> bool:
    from runner.azureml.checks import check_finetune_size
    from runner.schema import ConfigError

    try:
        check_finetune_size(size, allow_list, model_name=model_name)
    except ConfigError:
        return False
    return True


def _compute_for(allow_list: List[str], gpus_per_node: Optional[int]) -> Optional[str]:
    """An Azure compute preset whose size is in the allow list: the first with the current GPUs per node, else the
    first in the allow list's order."""
    from runner.presets import compute_presets_for, group_presets

    choices = compute_presets_for(allow_list)
    if not choices:
        return None
    presets = group_presets("compute")
    same = [c for c in choices if gpus_per_node and presets[c].get("gpus_per_node") == gpus_per_node]
    return (same or choices)[0]


def preset_suggestions(*, compute_size: Optional[str] = None, gpus_per_node: Optional[int] = None,
                       instance_type: Optional[str] = None, registry: Optional[str] = None,
                       exclude: Iterable[str] = (), live: Optional[List[RegistryModel]] = None,
                       first: Optional[str] = None, today: Any = None) -> List[Suggestion]:
    """Model presets that pass the model step's checks, each with the overrides it needs.

    compute_size / instance_type: the refused run's cluster and endpoint sizes (None: unknown, so a compute preset
    and an endpoint size are always named). registry: only presets of that registry. exclude: model names (the
    refused model). live: the registry's current models (registry_finetune_models); when given, a preset is
    suggested only if its model is among them, with the registry's allow lists where it shows them. first: the
    preset to put first (the refused model's replacement_config)."""
    excluded = {str(e).lower() for e in exclude}
    current = {m.name: m for m in live} if live is not None else None
    found: List[Suggestion] = []
    for preset, model_cfg in model_presets().items():
        if model_cfg.build_tiny or str(model_cfg.name).lower() in excluded:
            continue
        if registry is not None and model_cfg.registry != registry:
            continue
        facts = facts_from_config(model_cfg, today)
        if facts.archived:
            continue
        finetune_list, inference_list = facts.finetune_allow_list, facts.inference_allow_list
        if current is not None:
            if model_cfg.name not in current:
                continue
            finetune_list = current[model_cfg.name].finetune_allow_list or finetune_list
            inference_list = current[model_cfg.name].inference_allow_list or inference_list
        if not finetune_list:  # no allow list known (phi4_mini_instruct, a serverless model): nothing to check it by
            continue
        overrides = [f"model={preset}"]
        if compute_size is None or not _size_passes(compute_size, finetune_list, facts.name):
            compute = _compute_for(finetune_list, gpus_per_node)
            if compute is None:
                continue  # no shipped cluster preset passes: nothing to suggest that would run
            overrides.append(f"compute={compute}")
        if inference_list and (instance_type is None
                               or instance_type.lower() not in [s.lower() for s in inference_list]):
            overrides.append(f"deployment.instance_type={inference_list[0]}")
        found.append(Suggestion(preset=preset, model_name=str(model_cfg.name), overrides=overrides))
    found.sort(key=lambda s: s.preset != first)  # stable: the replacement first, then preset order
    return found


def suggestions_for(cfg: Any, *, exclude: Iterable[str] = (), live: Optional[List[RegistryModel]] = None,
                    today: Any = None) -> List[Suggestion]:
    """preset_suggestions for a run's config (its cluster, endpoint size and registry)."""
    return preset_suggestions(compute_size=str(cfg.compute.size), gpus_per_node=cfg.compute.gpus_per_node,
                              instance_type=str(cfg.deployment.instance_type), registry=cfg.model.registry,
                              exclude=exclude, live=live, first=cfg.model.replacement_config, today=today)


def registry_preset_names() -> List[str]:
    """The registry model names the presets stand for (what registry_finetune_models needs to look up)."""
    return sorted({str(m.name) for m in model_presets().values() if not m.build_tiny})


def archived_message(facts: ModelFacts, model_cfg: Any, *, cfg: Any = None, registry_models: Any = None,
                     today: Optional[dt.date] = None) -> str:
    """The refusal of an archived/retired model, with the current models to switch to.

    Each suggestion is a model preset plus what to add to the command line so that the run passes the model
    step's checks (preset_suggestions): not archived, the cluster and endpoint sizes in its allow lists.
    cfg: the run's config (its cluster and endpoint sizes; without it a compute preset and an endpoint size are
    always named). registry_models: the registry's ModelOperations (a real run): only models the registry lists as
    current and declaring chat-completion fine-tuning are suggested, with the registry's allow lists."""
    when = f", fine-tuning retired {facts.finetune_retirement_date}" if facts.finetune_retirement_date else ""
    why = "; ".join(facts.archived_because)
    live, unread = None, ""
    if registry_models is not None:
        from azure.core.exceptions import AzureError

        try:
            live = registry_finetune_models(registry_models, names=registry_preset_names())
        except AzureError as exc:  # the refusal must still say something useful
            unread = f" (registry {model_cfg.registry} could not be listed: {type(exc).__name__})"
    suggestions = preset_suggestions(
        compute_size=str(cfg.compute.size) if cfg is not None else None,
        gpus_per_node=cfg.compute.gpus_per_node if cfg is not None else None,
        instance_type=str(cfg.deployment.instance_type) if cfg is not None else None,
        registry=model_cfg.registry, exclude=[facts.name, model_cfg.name], live=live,
        first=model_cfg.replacement_config, today=today)
    where = f"registry {model_cfg.registry}" if live is not None else f"the model presets{unread}"
    if suggestions:
        listed = "; ".join(f"{s.model_name}: `{s.command}`" for s in suggestions)
        switch = (f" Current models for {TASK} fine-tuning in {where} (add to your command line; each passes "
                  f"the checks): {listed}")
    else:
        switch = (f" No model preset in conf/model/ is current for {TASK} fine-tuning in {where}: add one for a "
                  f"current model and choose it with model=<preset>")
    return (f"model {facts.name} is archived{when} ({why}).{switch}; or set model.allow_archived=true to "
            f"go ahead anyway.")
