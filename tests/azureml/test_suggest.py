"""What an archived model's refusal suggests: only presets that pass the checks, and (in a real run) only models
the registry lists as current and fine-tunable for chat-completion.

The registry client is `create_autospec(ModelOperations)` (the SDK's own signatures), returning real
azure.ai.ml.entities.Model objects: built with Model(...) or decoded from a REST reply by the SDK's own
`Model._from_rest_object` / `_from_container_rest_object`, so they keep exactly what azure-ai-ml 1.35 keeps of a
registry model (stage, tags, properties, flavors; no system metadata; containers without tags).
"""

import re
from unittest.mock import create_autospec

import pytest
from azure.ai.ml.entities import Model
from azure.ai.ml.operations import ModelOperations
from azure.core.exceptions import ResourceNotFoundError

from runner.azureml.checks import check_finetune_size, check_inference_size
from runner.azureml.suggest import (
    finetune_tasks,
    preset_suggestions,
    registry_finetune_models,
    suggestions_for,
)
from runner.azureml.suggest import archived_message
from runner.azureml.tags import facts_from_config
from runner.schema import ConfigError, validate
from tests.conftest import compose_cfg

REGISTRY_ID = "azureml://registries/azureml/models/{name}/versions/{version}"
PHI4_DEFAULTS = ("{'apply_deepspeed': 'true', 'deepspeed_stage': 3, 'apply_lora': 'true', 'precision': 16, "
                 "'num_train_epochs': 1, 'learning_rate': '5e-6'}")
CHAT_FLAVORS = {"hftransformersv2": {"task_type": "chat-completion"}}


def rest_model(name, version, *, stage=None, tags=None, properties=None, system_metadata=None):
    """A registry model version as the SDK decodes it from the service's JSON (ModelOperations.get)."""
    from azure.ai.ml.operations._model_operations import ArmModelVersion

    body = {
        "id": REGISTRY_ID.format(name=name, version=version),
        "name": version,
        "properties": {
            "tags": tags or {}, "properties": properties or {}, "isArchived": stage == "Archived",
            "flavors": {k: {"data": v} for k, v in CHAT_FLAVORS.items()}, "modelType": "mlflow_model",
            "modelUri": REGISTRY_ID.format(name=name, version=version), "stage": stage,
            "systemMetadata": system_metadata,
        },
    }
    return Model._from_rest_object(ArmModelVersion(body))


def container(name, latest="1"):
    """What `models.list()` yields for a registry: a container, name and latest version only."""
    from azure.ai.ml.operations._model_operations import ArmModelContainer

    return Model._from_container_rest_object(ArmModelContainer(
        {"id": f"azureml://registries/azureml/models/{name}", "name": name,
         "properties": {"latestVersion": latest}}))


def phi4_as_the_sdk_returns_it():
    # the Phi-4 spec: fine-tuning task and SKU lists only in system metadata, which the SDK drops
    return rest_model("Phi-4", "8", tags={"model_specific_defaults": PHI4_DEFAULTS}, system_metadata={
        "tasks": {"fineTuningTasks": ["chat-completion"]},
        "SKU": {"finetuneRecommendedSkus": ["Standard_NC24ads_A100_v4"]}})


def registry_ops(listed, latest=None, missing=()):
    ops = create_autospec(ModelOperations, instance=True)
    ops.list.return_value = listed
    latest = latest or {}

    def get(name, version=None, label=None):
        if name in missing:
            raise ResourceNotFoundError(f"model {name} not found")
        return latest[name]

    ops.get.side_effect = get
    return ops


# ---- what the SDK keeps, and the live listing --------------------------------------------------------------------


def test_the_sdk_keeps_stage_tags_properties_and_flavors_but_not_system_metadata():
    phi4 = phi4_as_the_sdk_returns_it()
    assert phi4._system_metadata is None  # so the fine-tuning task must come from what is kept
    assert finetune_tasks(phi4) == ["chat-completion"]  # a model_specific_defaults tag + its flavor's task
    assert finetune_tasks(Model(name="x", version="1", properties={"finetuning-tasks": "text-classification, "
                                                                                          "chat-completion"})) == [
        "text-classification", "chat-completion"]
    assert finetune_tasks(Model(name="x", version="1", tags={"task": "chat-completion"})) == []  # inference only


def test_registry_listing_keeps_current_models_that_declare_chat_completion_fine_tuning():
    listed = [
        Model(name="Phi-4", version="8", tags={"model_specific_defaults": PHI4_DEFAULTS},
              properties={"finetuning-tasks": "chat-completion",
                          "finetune-recommended-sku": "Standard_NC24ads_A100_v4, Standard_ND96isr_H100_v5"}),
        Model(name="Phi-3-mini-4k-instruct", version="15", stage="Archived",
              properties={"finetuning-tasks": "chat-completion"}),
        Model(name="bert-base-uncased", version="3", properties={"finetuning-tasks": "text-classification"}),
        Model(name="Phi-archived-tag", version="2", tags={"isArchived": "true"},
              properties={"finetuning-tasks": "chat-completion"}),
    ]
    ops = registry_ops(listed)
    found = registry_finetune_models(ops)
    assert [m.name for m in found] == ["Phi-4"]
    assert found[0].finetune_allow_list == ["Standard_NC24ads_A100_v4", "Standard_ND96isr_H100_v5"]
    ops.list.assert_called_once_with()
    ops.get.assert_not_called()  # the entries carried their tags and properties


def test_registry_containers_are_looked_up_by_label_only_for_the_wanted_names():
    ops = registry_ops([container("Phi-4", "8"), container("Mistral-large", "2"), container("gone", "1")],
                       latest={"Phi-4": phi4_as_the_sdk_returns_it()}, missing={"gone"})
    found = registry_finetune_models(ops, names=["Phi-4", "gone", "Phi-3-mini-4k-instruct"])
    assert [(m.name, m.version, m.finetune_tasks) for m in found] == [("Phi-4", "8", ["chat-completion"])]
    assert sorted(c.kwargs["name"] for c in ops.get.call_args_list) == ["Phi-4", "gone"]
    assert all(c.kwargs["label"] == "latest" for c in ops.get.call_args_list)
    # Phi-3-mini-4k-instruct is archived: the service's active-only list leaves it out, so it is never suggested


# ---- the suggestions pass the checks -----------------------------------------------------------------------------

ARCHIVED_RUNS = [
    ["experiment=phi3_ultrachat"],
    ["experiment=phi3_ultrachat", "compute=nd40rs_v2"],
    ["backend=azureml", "model=phi35_mini_instruct", "compute=nc24ads_a100_v4", "deployment=azure"],
    ["backend=azureml", "model=phi3_mini_4k_instruct", "compute=nd96asr_v4", "deployment=azure"],
    ["backend=azureml", "model=phi3_mini_4k_instruct", "compute=nd40rs_v2", "deployment=azure"],
]


def printed_commands(message):
    return re.findall(r"`(model=[^`]*)`", message)


def assert_passes_the_checks(overrides):
    cfg = compose_cfg(overrides)
    validate(cfg)
    facts = facts_from_config(cfg.model)
    assert not facts.archived, (overrides, facts.archived_because)
    check_finetune_size(cfg.compute.size, facts.finetune_allow_list, model_name=facts.name)
    check_inference_size(cfg.deployment.instance_type, facts.inference_allow_list, model_name=facts.name)
    return cfg


@pytest.mark.parametrize("with_cfg", [True, False], ids=["with-cfg", "model-only"])
@pytest.mark.parametrize("base", ARCHIVED_RUNS, ids=[" ".join(r) for r in ARCHIVED_RUNS])
def test_every_printed_suggestion_composes_and_passes_validation_and_the_allow_lists(base, with_cfg):
    cfg = compose_cfg(base)
    facts = facts_from_config(cfg.model)
    assert facts.archived
    message = archived_message(facts, cfg.model, cfg=cfg if with_cfg else None)
    commands = printed_commands(message)
    assert commands, message
    assert "phi35_mini_instruct" not in message and "phi3_mini_4k_instruct" not in message  # archived ones
    for command in commands:
        new = assert_passes_the_checks(base + command.split())
        assert new.model.name != cfg.model.name


def test_a_suggestion_keeps_the_runs_cluster_when_the_new_model_allows_it():
    cfg = compose_cfg(["experiment=phi3_ultrachat"])
    [phi4] = suggestions_for(cfg, exclude=[cfg.model.name])
    # the endpoint's size (deployment=azure's Standard_NC24ads_A100_v4, since the notebook's NC6s_v3 is retired) is in
    # Phi-4's inference list too: nothing else to change
    assert phi4.overrides == ["model=phi4"]
    cfg = compose_cfg(["experiment=phi3_ultrachat", "compute=nd40rs_v2"])  # V100: not in Phi-4's list
    [phi4] = suggestions_for(cfg, exclude=[cfg.model.name])
    assert phi4.overrides[:2] == ["model=phi4", "compute=nd96asr_v4"]  # the 8-GPU size in Phi-4's list


def test_the_real_run_suggests_only_what_the_registry_lists_as_current():
    cfg = compose_cfg(["experiment=phi3_ultrachat"])
    facts = facts_from_config(cfg.model)
    ops = registry_ops([container("Phi-4", "8")], latest={"Phi-4": phi4_as_the_sdk_returns_it()})
    message = archived_message(facts, cfg.model, cfg=cfg, registry_models=ops)
    assert "registry azureml" in message and printed_commands(message) == ["model=phi4"]
    # the registry no longer lists Phi-4 as current: nothing is suggested that the model step would refuse
    gone = archived_message(facts, cfg.model, cfg=cfg, registry_models=registry_ops([container("Other", "1")]))
    assert printed_commands(gone) == [] and "model.allow_archived=true" in gone


def test_registry_allow_lists_win_over_the_presets():
    listed = [Model(name="Phi-4", version="9", tags={"model_specific_defaults": PHI4_DEFAULTS}, flavors=CHAT_FLAVORS,
                    properties={"finetune-recommended-sku": "Standard_ND96isr_H100_v5",
                                "inference-recommended-sku": "Standard_NC40ads_H100_v5"})]
    live = registry_finetune_models(registry_ops(listed))
    [phi4] = preset_suggestions(compute_size="Standard_ND96asr_v4", gpus_per_node=8,
                                instance_type="Standard_NC6s_v3", registry="azureml", live=live)
    assert phi4.overrides == ["model=phi4", "compute=nd96isr_h100_v5",
                              "deployment.instance_type=Standard_NC40ads_H100_v5"]


def test_the_phi35_size_refusal_names_only_presets_in_its_list():
    cfg = compose_cfg(["backend=azureml", "model=phi35_mini_instruct", "compute=nd96asr_v4", "deployment=azure"])
    facts = facts_from_config(cfg.model)
    with pytest.raises(ConfigError) as err:
        check_finetune_size(cfg.compute.size, facts.finetune_allow_list, model_name=facts.name)
    named = re.search(r"compute=([\w |]+)", str(err.value).split("allow list")[1]).group(1).split(" | ")
    assert named and "nd96asr_v4" not in named
    for preset in named:
        fixed = compose_cfg(["backend=azureml", "model=phi35_mini_instruct", f"compute={preset.strip()}",
                             "deployment=azure"])
        check_finetune_size(fixed.compute.size, facts.finetune_allow_list, model_name=facts.name)


def test_a_registry_that_cannot_be_listed_falls_back_to_the_presets():
    from azure.core.exceptions import HttpResponseError

    cfg = compose_cfg(["experiment=phi3_ultrachat"])
    ops = create_autospec(ModelOperations, instance=True)
    ops.list.side_effect = HttpResponseError("403 Forbidden")
    message = archived_message(facts_from_config(cfg.model), cfg.model, cfg=cfg, registry_models=ops)
    assert "could not be listed: HttpResponseError" in message
    assert printed_commands(message) == ["model=phi4"]
