"""Every shipped preset composes and validates; the two experiments are what they claim to be."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from runner.finetune_params import merge_finetune_params, pipeline_display_name
from runner.schema import validate
from tests.conftest import CONF_DIR, compose_cfg

GROUPS = ["model", "compute", "dataset", "finetune", "deployment", "backend", "experiment", "hparams_search"]


def presets(group):
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


ALL = [(g, p) for g in GROUPS for p in presets(g)]


def test_every_group_has_real_presets():
    for group in GROUPS[:-1]:
        assert len(presets(group)) >= 2, group
    assert presets("hparams_search") == ["optuna_lr_rank"]
    assert {"phi3_mini_4k_instruct", "phi35_mini_instruct", "tiny_phi3"} <= set(presets("model"))
    assert {"default", "lora", "lora_deepspeed2", "full_deepspeed3"} <= set(presets("finetune"))
    assert {"local_cpu", "local_gpu", "nc24ads_a100_v4", "nc48ads_a100_v4", "nc96ads_a100_v4", "nd96asr_v4",
            "nc24rs_v3", "nc12s_v3"} <= set(presets("compute"))


def kind(group, preset):
    """A compute/deployment preset's kind (conf/<group>/<preset>.yaml), else None."""
    if group not in ("compute", "deployment"):
        return None
    return OmegaConf.load(Path(CONF_DIR) / group / f"{preset}.yaml").get("kind")


# What each preset needs around it to be a valid run: an Azure cluster or endpoint needs the azureml backend (and a
# registry model whose allow lists hold the preset's size), every other preset composes on the bare `ftrun`.
AZURE = ["backend=azureml", "model=phi4", "compute=nd96asr_v4", "deployment=azure",
         "deployment.instance_type=Standard_NC24ads_A100_v4"]


def base_for(group, preset):
    if group in ("compute", "deployment") and kind(group, preset) == "azure":
        return AZURE
    if group == "backend" and preset == "azureml":
        return AZURE
    return []


@pytest.mark.parametrize("group, preset", ALL, ids=[f"{g}={p}" for g, p in ALL])
def test_preset_composes_resolves_and_validates(group, preset):
    cfg = compose_cfg(base_for(group, preset) + [f"{group}={preset}"])
    validate(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_command_line_group_choice_brings_no_other_presets_settings():
    cfg = compose_cfg(["model=phi35_mini_instruct", "finetune=lora"])
    assert cfg.model.name == "Phi-3.5-mini-instruct"
    assert cfg.finetune.apply_lora is True
    # the tiny model's training recipe stays with the tiny model
    assert cfg.finetune.per_device_train_batch_size == 1 and cfg.finetune.learning_rate == 2e-5


def test_compute_presets_know_their_gpus():
    expected = {"nc24ads_a100_v4": 1, "nc48ads_a100_v4": 2, "nc96ads_a100_v4": 4, "nd96asr_v4": 8,
                "nc24rs_v3": 4, "nc12s_v3": 2}
    for preset, gpus in expected.items():
        cfg = compose_cfg([f"compute={preset}"])
        assert cfg.compute.gpus_per_node == gpus, preset
        assert cfg.compute.size.lower() == "standard_" + preset.replace("standard_", "")


def test_default_is_the_local_tiny_run():
    cfg = compose_cfg()
    assert cfg.backend.name == "local" and cfg.model.build_tiny and cfg.dataset.source == "sample"
    assert cfg.compute.device == "cpu" and cfg.deployment.host == "127.0.0.1"


def test_phi3_ultrachat_is_the_notebook_run():
    cfg = compose_cfg(["experiment=phi3_ultrachat"])
    assert cfg.backend.name == "azureml" and cfg.backend.registry_name == "azureml"
    assert cfg.backend.experiment_name == "chat_completion_Phi-3-mini-4k-instruct"
    assert cfg.model.name == "Phi-3-mini-4k-instruct" and cfg.model.label == "latest"
    assert cfg.dataset.name == "HuggingFaceH4/ultrachat_200k" and cfg.dataset.split_percent == 5
    assert cfg.compute.name == "gpu-cluster-big"
    assert cfg.compute.size in cfg.model.finetune_compute_allow_list
    d = cfg.deployment
    assert (d.instance_type, d.instance_count, d.liveness_initial_delay, d.request_timeout_ms) == (
        "Standard_NC6s_v3", 1, 600, 90000)
    assert dict(d.traffic) == {"demo": 100} and d.endpoint_name_prefix == "ultrachat-completion-"
    assert d.sample_parameters == {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 200}
    params, _ = merge_finetune_params(cfg.finetune, OmegaConf.to_container(cfg.model.model_specific_defaults))
    assert pipeline_display_name(cfg.model.name, params, cfg.compute.gpus_per_node) == (
        "Phi-3-mini-4k-instruct-ultrachat-bs8-cosine-ds2-lora-save_limit1-seqlen-1")
