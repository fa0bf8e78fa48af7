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
    assert {"phi3_mini_4k_instruct", "phi35_mini_instruct", "phi4", "tiny_phi3"} <= set(presets("model"))
    assert {"local_tiny", "phi3_ultrachat", "phi4_ultrachat"} <= set(presets("experiment"))
    assert {"default", "lora", "lora_deepspeed2", "full_deepspeed3"} <= set(presets("finetune"))
    assert {"local_cpu", "local_gpu", "nc24ads_a100_v4", "nc48ads_a100_v4", "nc96ads_a100_v4", "nd96asr_v4",
            "nc40ads_h100_v5", "nc80adis_h100_v5", "nd96isr_h100_v5"} <= set(presets("compute"))


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
    if group in ("compute", "deployment") and kind(group, preset) in ("azure", "managed_online"):
        return AZURE
    if group in ("compute", "deployment") and kind(group, preset) == "serverless":  # a serverless Phi-4 route
        return ["experiment=phi4_mini_serverless"]
    if group == "backend" and preset == "azureml":
        return AZURE
    if group == "dataset" and preset == "local":  # the user's own file is required
        return ["dataset.train_file=/data/chats.jsonl"]
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
    expected = {"nc24ads_a100_v4": (1, 80), "nc48ads_a100_v4": (2, 80), "nc96ads_a100_v4": (4, 80),
                "nd96asr_v4": (8, 40), "nd96amsr_a100_v4": (8, 80), 
                "nd40rs_v2": (8, 32), "nc40ads_h100_v5": (1, 94), "nc80adis_h100_v5": (2, 94),
                "nd96isr_h100_v5": (8, 80)}
    assert set(expected) == {p for p in presets("compute") if kind("compute", p) == "azure"}
    for preset, (gpus, memory) in expected.items():
        cfg = compose_cfg(AZURE + [f"compute={preset}"])
        assert (cfg.compute.gpus_per_node, cfg.compute.gpu_memory_gb) == (gpus, memory), preset
        assert cfg.compute.size.lower() == "standard_" + preset.replace("standard_", "")


def registry_models():
    return [p for p in presets("model") if not compose_cfg([f"model={p}"]).model.build_tiny]


def valid_combinations():
    """Every (model, compute, deployment) that should run: each registry model on each Azure cluster preset in its
    fine-tune allow list, deployed to an inference size in its list; every model on each local compute."""
    combos = []
    for model in presets("model"):
        for compute in presets("compute"):
            if kind("compute", compute) == "local":
                combos.append([f"model={model}", f"compute={compute}"])
    for model in registry_models():
        m = compose_cfg([f"model={model}"]).model
        for compute in presets("compute"):
            size = OmegaConf.load(Path(CONF_DIR) / "compute" / f"{compute}.yaml").size
            if kind("compute", compute) == "azure" and size in m.finetune_compute_allow_list:
                combos.append(["backend=azureml", f"model={model}", f"compute={compute}", "deployment=azure",
                               f"deployment.instance_type={current_sizes(m.inference_compute_allow_list)[0]}"])
    return combos


def current_sizes(sizes):
    """The sizes of a model's allow list that Azure has not retired (runner/azureml/data/retired_skus.yaml)."""
    from runner.retired_skus import retired

    return [s for s in sizes if not retired(s)]


def test_every_valid_combination_composes_validates_and_passes_the_allow_lists():
    from runner.azureml.checks import check_finetune_size, check_inference_size
    from runner.azureml.tags import facts_from_config

    combos = valid_combinations()
    # local; Phi-3-mini, Phi-3.5-mini (archived: with allow_archived), Phi-4 (Phi-4-mini-instruct records no allow
    # lists: it runs serverless, experiment=phi4_mini_serverless)
    assert len(combos) == 5 * 2 + 5 + 4 + 8
    for overrides in combos:
        cfg = compose_cfg(overrides)
        validate(cfg)
        if cfg.backend.name == "azureml":
            facts = facts_from_config(cfg.model)
            check_finetune_size(cfg.compute.size, facts.finetune_allow_list, model_name=facts.name)
            check_inference_size(cfg.deployment.instance_type, facts.inference_allow_list, model_name=facts.name)


def test_every_experiment_validates_and_fits_its_models_allow_lists():
    from runner.azureml.checks import check_finetune_size, check_inference_size
    from runner.azureml.tags import facts_from_config

    for experiment in presets("experiment"):
        cfg = compose_cfg([f"experiment={experiment}"])
        validate(cfg)
        if cfg.backend.name == "azureml":
            facts = facts_from_config(cfg.model)
            check_finetune_size(cfg.compute.size, facts.finetune_allow_list, model_name=facts.name)
            check_inference_size(cfg.deployment.instance_type, facts.inference_allow_list, model_name=facts.name)


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
        "Standard_NC24ads_A100_v4", 1, 600, 90000)  # the notebook's NC6s_v3 is retired (retired_skus.yaml)
    assert dict(d.traffic) == {"demo": 100} and d.endpoint_name_prefix == "ultrachat-completion-"
    assert d.sample_parameters == {"temperature": 0.6, "top_p": 0.9, "do_sample": True, "max_new_tokens": 200}
    params, _ = merge_finetune_params(cfg.finetune, OmegaConf.to_container(cfg.model.model_specific_defaults))
    assert pipeline_display_name(cfg.model.name, params, cfg.compute.gpus_per_node) == (
        "Phi-3-mini-4k-instruct-ultrachat-bs8-cosine-ds2-lora-save_limit1-seqlen-1")


def test_phi4_ultrachat_is_the_notebook_run_on_a_current_model():
    from runner.azureml.tags import facts_from_config

    cfg = compose_cfg(["experiment=phi4_ultrachat"])
    assert cfg.backend.name == "azureml" and cfg.model.name == "Phi-4" and cfg.model.label == "latest"
    assert not facts_from_config(cfg.model).archived and not cfg.model.allow_archived
    assert cfg.dataset.name == "HuggingFaceH4/ultrachat_200k" and cfg.dataset.split_percent == 5
    assert cfg.compute.size in cfg.model.finetune_compute_allow_list
    assert cfg.deployment.instance_type in cfg.model.inference_compute_allow_list
    assert {"Standard_NC40ads_H100_v5", "Standard_NC80adis_H100_v5", "Standard_ND96isr_H100_v5"} <= set(
        cfg.model.finetune_compute_allow_list)
    params, _ = merge_finetune_params(cfg.finetune, OmegaConf.to_container(cfg.model.model_specific_defaults))
    assert (params["apply_lora"], params["apply_deepspeed"], params["deepspeed_stage"]) == (True, True, 3)
    assert pipeline_display_name(cfg.model.name, params, cfg.compute.gpus_per_node) == (
        "Phi-4-ultrachat-bs8-cosine-ds3-lora-save_limit1-seqlen-1")


def test_phi4_ultrachat_dry_run_plans_a_job_that_passes_every_check(tmp_path):
    import yaml

    from runner.workflow import run

    overrides = ["experiment=phi4_ultrachat", "dry_run=true"]
    cfg = compose_cfg(overrides)
    run(cfg, run_dir=tmp_path / "run", task_overrides=overrides)  # raises on any refusal (spec, allow lists)
    plan = tmp_path / "run" / "plan"
    summary = yaml.safe_load((plan / "plan.yaml").read_text())
    assert summary["warnings"] == []  # not archived: no model.allow_archived needed
    job = yaml.safe_load((plan / "pipeline_job.yaml").read_text())
    assert job["display_name"] == "Phi-4-ultrachat-bs8-cosine-ds3-lora-save_limit1-seqlen-1"
    [inputs] = [j["inputs"] for j in job["jobs"].values()]
    assert inputs["mlflow_model_path"]["path"] == "azureml://registries/azureml/models/Phi-4/versions/8"
    assert str(inputs["deepspeed_stage"]) == "3" and float(inputs["learning_rate"]) == 5e-6
    deployment = yaml.safe_load((plan / "deployment.yaml").read_text())
    assert deployment["instance_type"] == "Standard_NC24ads_A100_v4"
