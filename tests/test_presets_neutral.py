"""A run gets settings only from the presets it names; a compute or deployment preset of the wrong kind for the
backend is refused before anything runs; the bare `ftrun` is still the tiny local run.
"""

import dataclasses
import re

import pytest
import yaml
from omegaconf import OmegaConf

from runner.schema import ConfigError, DeploymentConfig, FinetuneConfig, validate
from runner.workflow import run
from tests.conftest import compose_cfg

PHI3_AZURE = ["backend=azureml", "model=phi3_mini_4k_instruct", "compute=nd96asr_v4", "deployment=azure"]

# The tiny model's training recipe (conf/model/tiny_phi3.yaml)
TINY_RECIPE = {"num_train_epochs": 15, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
               "learning_rate": 2e-3, "lr_scheduler_type": "cosine", "warmup_steps": 10, "max_seq_length": 512,
               "evaluation_strategy": "steps", "eval_steps": 100, "logging_steps": 5, "save_total_limit": 2}


def schema_finetune():
    return OmegaConf.to_container(OmegaConf.structured(FinetuneConfig))


def refusal(overrides):
    cfg = compose_cfg(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    return str(err.value)


# ---- the wrong kind for the backend is refused -------------------------------------------------------------------


def test_azure_backend_refuses_the_local_compute_and_endpoint_naming_the_keys():
    message = refusal(["backend=azureml", "model=phi3_mini_4k_instruct"])
    compute_line = next(line for line in message.splitlines() if "compute.kind" in line)
    assert "compute=local_cpu" in compute_line and "backend=azureml" in compute_line
    # the suggested clusters are Azure presets in the model's fine-tune allow list
    named = re.search(r"compute=([\w |]+)$", compute_line).group(1).split(" | ")
    assert "nd96asr_v4" in named and "local_gpu" not in named and "nd40rs_v2" not in named
    assert any("deployment.kind" in line and "deployment=azure" in line for line in message.splitlines())


def test_local_backend_refuses_an_azure_cluster_or_endpoint():
    message = refusal(["compute=nd96asr_v4"])
    assert "compute.kind=azure" in message and "compute=local_cpu | local_gpu" in message
    message = refusal(["deployment=azure"])
    # deployment=azure is a managed online endpoint (kind managed_online; `azure` is its old name, still accepted)
    assert "deployment.kind=managed_online: deployment=azure" in message and "deployment=local" in message


@pytest.mark.parametrize("overrides", [["backend=azureml", "model=phi3_mini_4k_instruct"],
                                       ["backend=azureml", "model=phi4"], ["compute=nc40ads_h100_v5"],
                                       ["deployment=azure"]], ids=" ".join)
def test_each_preset_a_kind_refusal_names_makes_the_run_valid(overrides):
    message = refusal(overrides)
    fixes = {}
    for line in message.splitlines()[1:]:  # after "invalid config:"
        m = re.search(r"- (compute|deployment)\.kind=.*: \1=([\w |]+)$", line)
        assert m, line
        fixes[m.group(1)] = m.group(2).split(" | ")
    for group, presets in fixes.items():
        for preset in presets:
            others = [f"{g}={p[0]}" for g, p in fixes.items() if g != group]
            validate(compose_cfg(overrides + others + [f"{group}={preset}"]))


def test_compute_kind_mismatch_passed_validation_before_only_because_kind_was_never_read():
    # compute.kind / deployment.kind exist in every preset; an explicit kind fixes nothing by itself
    message = refusal(PHI3_AZURE + ["compute.kind=local"])
    assert "compute.kind=local" in message


# ---- no settings from a preset the user did not ask for ---------------------------------------------------------


@pytest.mark.parametrize("overrides", [PHI3_AZURE, ["model=phi35_mini_instruct"],
                                       ["model=phi4", "compute=local_gpu"]], ids=" ".join)
def test_a_model_other_than_tiny_gets_no_tiny_recipe(overrides):
    cfg = compose_cfg(overrides)
    assert OmegaConf.to_container(cfg.finetune) == schema_finetune()
    default_sample = DeploymentConfig().sample_parameters
    assert OmegaConf.to_container(cfg.deployment.sample_parameters) == default_sample


def test_the_bare_ftrun_is_still_the_tiny_local_run():
    cfg = compose_cfg()
    assert cfg.backend.name == "local" and cfg.model.build_tiny and cfg.compute.kind == "local"
    assert {k: cfg.finetune[k] for k in TINY_RECIPE} == TINY_RECIPE
    assert list(cfg.finetune.local.lora_modules_to_save) == ["lm_head", "embed_tokens"]
    assert cfg.finetune.local.save_steps == 100 and cfg.deployment.sample_parameters.max_new_tokens == 64
    validate(cfg)
    # experiment=local_tiny names the same run
    assert OmegaConf.to_container(compose_cfg(["experiment=local_tiny"])) == OmegaConf.to_container(cfg)


def test_overrides_win_over_the_tiny_recipe_in_the_usual_order(tmp_path):
    # command line > experiment > finetune preset > the model's recipe
    cfg = compose_cfg(["finetune=lora", "finetune.learning_rate=1e-4"])
    assert cfg.finetune.apply_lora and cfg.finetune.learning_rate == 1e-4 and cfg.finetune.num_train_epochs == 15
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "short_tiny.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: tiny_phi3\nfinetune:\n  num_train_epochs: 2\n"
        "  learning_rate: 1e-3\n")
    searchpath = f"hydra.searchpath=[file://{tmp_path}]"
    cfg = compose_cfg([searchpath, "experiment=short_tiny"])
    assert (cfg.finetune.num_train_epochs, cfg.finetune.learning_rate, cfg.finetune.warmup_steps) == (2, 1e-3, 10)
    cfg = compose_cfg([searchpath, "experiment=short_tiny", "finetune.num_train_epochs=4"])
    assert cfg.finetune.num_train_epochs == 4


def test_azure_dry_run_takes_the_models_defaults_not_the_tiny_recipe(tmp_path):
    overrides = PHI3_AZURE + ["dry_run=true"]
    run(compose_cfg(overrides), run_dir=tmp_path / "run", task_overrides=overrides)
    job = yaml.safe_load((tmp_path / "run" / "plan" / "pipeline_job.yaml").read_text())
    [inputs] = [j["inputs"] for j in job["jobs"].values()]
    # from Phi-3-mini-4k-instruct's model_specific_defaults
    assert float(inputs["learning_rate"]) == 5e-6 and int(inputs["num_train_epochs"]) == 1
    assert inputs["lr_scheduler_type"] == "cosine" and int(inputs["per_device_train_batch_size"]) == 1
    # and nothing of the tiny recipe: the component's own defaults
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.name in TINY_RECIPE}
    for key in ("max_seq_length", "warmup_steps", "evaluation_strategy", "eval_steps", "per_device_eval_batch_size"):
        assert str(inputs[key]) == str(defaults[key]), key
