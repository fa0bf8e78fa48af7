"""Model tags parsed safely (json / ast.literal_eval only) into the facts the checks use."""

import datetime as dt

import pytest

from runner.azureml.checks import check_finetune_size, gpus_for_size, reconcile_gpus
from runner.azureml.tags import (
    TagError,
    archived_message,
    facts_from_config,
    facts_from_registry,
    parse_dict_tag,
    parse_list_tag,
)
from runner.schema import ConfigError
from tests.azureml_double import registry_phi3_model
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
    assert "retired 2025-08-30" in msg and "`model=phi4`" in msg


def test_allow_lists_from_system_metadata_when_tags_lack_them():
    m = compose_cfg(["experiment=phi3_ultrachat"]).model
    model = registry_phi3_model()
    model.tags = {}
    facts = facts_from_registry(model, m, today=dt.date(2025, 1, 1))
    assert facts.finetune_allow_list[0] == "Standard_NC24ads_A100_v4"
    assert facts.model_specific_defaults == {}
    # before the retirement date only the config's archived flag marks it
    assert facts.archived_because == ["model config archived=true"]


def test_config_facts_match_the_registry_spec():
    m = compose_cfg(["experiment=phi3_ultrachat"]).model
    live = facts_from_registry(registry_phi3_model(), m)
    offline = facts_from_config(m)
    assert sorted(offline.finetune_allow_list) == sorted(live.finetune_allow_list)
    assert sorted(offline.inference_allow_list) == sorted(live.inference_allow_list)
    assert offline.asset_id == "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/labels/latest"


def test_size_checks_are_case_insensitive():
    check_finetune_size("standard_nd96asr_v4", SKUS, model_name="m")
    with pytest.raises(ConfigError, match="compute.size=Standard_ND40rs_v2 is not in m's fine-tune"):
        check_finetune_size("Standard_ND40rs_v2", SKUS, model_name="m")
    sizes = [type("S", (), {"name": "Standard_ND96asr_v4", "gpus": 8})()]
    assert gpus_for_size(sizes, "STANDARD_ND96ASR_V4") == 8
    assert reconcile_gpus(8, 0, "Standard_ND96asr_v4") == 8
    with pytest.raises(ConfigError, match="not among the workspace's VM sizes"):
        reconcile_gpus(gpus_for_size(sizes, "Standard_X"), 0, "Standard_X")
