"""Model tags parsed safely (json / ast.literal_eval only) into the facts the checks use."""

import datetime as dt

import pytest

from runner.azureml.checks import check_finetune_size, gpus_for_size, reconcile_gpus
from runner.azureml.tags import (
    ModelFacts,
    TagError,
    allow_list_message,
    facts_from_config,
    facts_from_registry,
    parse_dict_tag,
    parse_list_tag,
)
from runner.azureml.suggest import archived_message
from runner.schema import ConfigError
from tests.azureml.double import model_from_rest, registry_model, registry_phi3_model, rest_body
from tests.conftest import compose_cfg

SKUS = ["Standard_NC24ads_A100_v4", "Standard_ND96asr_v4"]


@pytest.mark.parametrize("value", [
    SKUS, "['Standard_NC24ads_A100_v4', 'Standard_ND96asr_v4']", '["Standard_NC24ads_A100_v4", "Standard_ND96asr_v4"]',
    "Standard_NC24ads_A100_v4, Standard_ND96asr_v4", "('Standard_NC24ads_A100_v4', 'Standard_ND96asr_v4')",
])
def test_list_tag_formats(value):
    assert parse_list_tag(value, "finetune_compute_allow_list") == SKUS


@pytest.mark.parametrize("value", [
    {"apply_lora": "true", "deepspeed_stage": 2}, "{'apply_lora': 'true', 'deepspeed_stage': 2}",
    '{"apply_lora": "true", "deepspeed_stage": 2}', "OrderedDict([('apply_lora', 'true'), ('deepspeed_stage', 2)])",
])
def test_dict_tag_formats(value):
    assert parse_dict_tag(value, "model_specific_defaults") == {"apply_lora": "true", "deepspeed_stage": 2}


def test_tags_are_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(TagError, match="cannot parse"):
        parse_dict_tag(f"__import__('os').system('touch {marker}')", "model_specific_defaults")
    with pytest.raises(TagError, match="cannot parse"):
        parse_list_tag(f"[open('{marker}', 'w').write('x')]", "finetune_compute_allow_list")
    assert not marker.exists()


def test_registry_facts_for_phi3():
    m = compose_cfg(["experiment=phi3_ultrachat"]).model
    facts = facts_from_registry(registry_phi3_model(), m, today=dt.date(2026, 11, 1))
    assert facts.asset_id == "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/15"
    assert "Standard_ND96asr_v4" in facts.finetune_allow_list and "Standard_ND40rs_v2" not in facts.finetune_allow_list
    assert "Standard_NC6s_v3" in facts.inference_allow_list
    assert float(facts.model_specific_defaults["learning_rate_min"]) == 5e-7  # parsed; the merge drops it
    assert facts.archived and facts.finetune_retirement_date == "2025-08-30"
    msg = archived_message(facts, m)
    assert "retired 2025-08-30" in msg and "model=phi4" in msg


def test_allow_lists_from_properties_when_tags_lack_them():
    m = compose_cfg(["experiment=phi3_ultrachat"]).model
    model = registry_model("Phi-3-mini-4k-instruct", lists_in=["properties", "system_metadata"])
    model.tags.pop("model_specific_defaults")
    facts = facts_from_registry(model, m, today=dt.date(2025, 1, 1))
    assert facts.finetune_allow_list[0] == "Standard_NC24ads_A100_v4"
    assert facts.allow_list_source["finetune"] == "registry properties (finetune-recommended-sku)"
    assert facts.model_specific_defaults == {}
    # before the retirement date only the config's archived flag marks it
    assert facts.archived_because == ["model config archived=true"]


# ---- where the registry keeps the allow lists, as azure-ai-ml deserializes the registry's REST bodies -------------


def test_the_sdk_drops_a_registry_models_system_metadata():
    """The fact the runner must live with: azure-ai-ml 1.35 builds a registry Model without its system metadata, so
    Phi-4's lists (only there) never reach the runner."""
    body = rest_body("Phi-4")
    assert body["properties"]["systemMetadata"]["SKU"]["finetuneRecommendedSkus"]
    model = model_from_rest(body)
    assert (model.name, model.version) == ("Phi-4", "8")
    assert not getattr(model, "_system_metadata", None)
    assert not any("sku" in key.lower() or "allow_list" in key for key in {**model.tags, **model.properties})


def test_phi4_lists_only_in_system_metadata_fall_back_to_the_model_preset():
    m = compose_cfg(["experiment=phi4_ultrachat"]).model
    facts = facts_from_registry(registry_model("Phi-4"), m, today=dt.date(2026, 11, 1))
    assert facts.finetune_allow_list == list(m.finetune_compute_allow_list)
    assert "Standard_ND96isr_H100_v5" in facts.finetune_allow_list
    assert "Standard_ND40rs_v2" not in facts.finetune_allow_list
    assert facts.inference_allow_list == list(m.inference_compute_allow_list)
    assert facts.allow_list_source == {"finetune": "model preset (model.finetune_compute_allow_list)",
                                       "inference": "model preset (model.inference_compute_allow_list)"}
    assert facts.model_specific_defaults["deepspeed_stage"] == 3  # tags still arrive
    assert not facts.archived
    message = allow_list_message(facts)
    assert "model preset (model.finetune_compute_allow_list)" in message and "the model preset's list is used" in message


def test_phi4_lists_from_the_raw_rest_body_win_over_the_preset():
    """The system metadata the entity drops, read from the version's REST body: the registry's lists, not the
    preset's (emptied here so that only the body can supply them)."""
    m = compose_cfg(["experiment=phi4_ultrachat", "model.finetune_compute_allow_list=[]",
                     "model.inference_compute_allow_list=[]"]).model
    body = rest_body("Phi-4")
    facts = facts_from_registry(registry_model("Phi-4"), m, today=dt.date(2026, 11, 1), rest_body=body)
    assert facts.finetune_allow_list == body["properties"]["systemMetadata"]["SKU"]["finetuneRecommendedSkus"]
    assert facts.allow_list_source["finetune"] == "registry REST body system metadata (SKU.finetuneRecommendedSkus)"
    assert not facts.archived


def test_the_rest_bodys_isarchived_marks_a_model_archived_without_the_preset():
    m = compose_cfg(["model=phi4", "model.archived=false"]).model
    body = rest_body("Phi-4")
    body["properties"]["isArchived"] = True
    facts = facts_from_registry(registry_model("Phi-4"), m, today=dt.date(2026, 11, 1), rest_body=body)
    assert facts.archived and facts.archived_because == ["registry isArchived (REST body)"]


def test_one_presets_facts_never_apply_to_another_model_name():
    """model=phi4 model.name=Phi-4-mini-instruct: Phi-4's lists, dates and archived flag stay Phi-4's."""
    m = compose_cfg(["model=phi4", "model.name=Phi-4-mini-instruct", "model.archived=true",
                     "model.finetune_retirement_date=2020-01-01"]).model
    entity = registry_model("Phi-4")
    entity.name = "Phi-4-mini-instruct"  # a model the preset holds no facts of, without tags/properties lists
    facts = facts_from_registry(entity, m, today=dt.date(2026, 11, 1))
    assert facts.finetune_allow_list == [] and facts.inference_allow_list == []
    assert facts.allow_list_source["finetune"].startswith("none (the model preset's model.finetune_compute_allow_list "
                                                          "is Phi-4's")
    assert not facts.archived and facts.finetune_retirement_date is None
    offline = facts_from_config(m)
    assert offline.finetune_allow_list == [] and not offline.archived and offline.model_specific_defaults == {}
    same = facts_from_config(compose_cfg(["model=phi4"]).model)
    assert same.finetune_allow_list and same.version == "8"


def test_phi35_lists_from_properties_win_over_the_preset():
    m = compose_cfg(["experiment=phi3_ultrachat", "model=phi35_mini_instruct",
                     "model.finetune_compute_allow_list=[Standard_ND40rs_v2]"]).model
    facts = facts_from_registry(registry_model("Phi-3.5-mini-instruct"), m, today=dt.date(2026, 11, 1))
    assert facts.finetune_allow_list == ["Standard_NC24ads_A100_v4", "Standard_NC48ads_A100_v4",
                                         "Standard_NC96ads_A100_v4", "Standard_ND96amsr_A100_v4"]
    assert facts.allow_list_source == {"finetune": "registry properties (finetune-recommended-sku)",
                                       "inference": "registry properties (inference-recommended-sku)"}
    assert "drops" not in allow_list_message(facts)


def test_phi3_lists_from_tags_in_the_oldest_form():
    m = compose_cfg(["experiment=phi3_ultrachat"]).model
    facts = facts_from_registry(registry_phi3_model(), m, today=dt.date(2026, 11, 1))
    assert facts.allow_list_source == {"finetune": "registry tags (finetune_compute_allow_list)",
                                       "inference": "registry tags (inference_compute_allow_list)"}


def test_system_metadata_is_read_when_the_entity_keeps_it():
    """A Model entity that does carry system metadata (an SDK that keeps it): SKU lists first."""
    from azure.ai.ml.entities import Model

    meta = rest_body("Phi-4")["properties"]["systemMetadata"]
    model = Model(name="Phi-4", version="8", system_metadata=meta)
    m = compose_cfg(["experiment=phi4_ultrachat", "model.finetune_compute_allow_list=[]"]).model
    facts = facts_from_registry(model, m)
    assert facts.finetune_allow_list == meta["SKU"]["finetuneRecommendedSkus"]
    assert facts.allow_list_source["finetune"] == "registry system metadata (SKU.finetuneRecommendedSkus)"


def test_no_list_anywhere_is_said():
    m = compose_cfg(["experiment=phi4_ultrachat", "model.finetune_compute_allow_list=[]",
                     "model.inference_compute_allow_list=[]"]).model
    facts = facts_from_registry(registry_model("Phi-4"), m)
    assert facts.finetune_allow_list == [] and facts.allow_list_source["finetune"] == "none"
    assert "only K80 sizes are refused" in allow_list_message(facts)


def test_facts_round_trip_through_the_record():
    m = compose_cfg(["experiment=phi4_ultrachat"]).model
    facts = facts_from_registry(registry_model("Phi-4"), m)
    assert ModelFacts(**facts.to_dict()) == facts
    assert facts_from_config(m).allow_list_source["finetune"] == "model preset (model.finetune_compute_allow_list)"


def test_config_facts_match_the_registry_spec():
    m = compose_cfg(["experiment=phi3_ultrachat"]).model
    live = facts_from_registry(registry_phi3_model(), m)
    offline = facts_from_config(m)
    assert sorted(offline.finetune_allow_list) == sorted(live.finetune_allow_list)
    assert sorted(offline.inference_allow_list) == sorted(live.inference_allow_list)
    assert offline.asset_id == live.asset_id == "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/15"


def test_size_checks_are_case_insensitive():
    check_finetune_size("standard_nd96asr_v4", SKUS, model_name="m")
    with pytest.raises(ConfigError, match="compute.size=Standard_ND40rs_v2 is not in m's fine-tune"):
        check_finetune_size("Standard_ND40rs_v2", SKUS, model_name="m")
    sizes = [type("S", (), {"name": "Standard_ND96asr_v4", "gpus": 8})()]
    assert gpus_for_size(sizes, "STANDARD_ND96ASR_V4") == 8
    assert reconcile_gpus(8, 0, "Standard_ND96asr_v4") == 8
    with pytest.raises(ConfigError, match="not among the workspace's VM sizes"):
        reconcile_gpus(gpus_for_size(sizes, "Standard_X"), 0, "Standard_X")
