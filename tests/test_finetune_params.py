"""Merge order, tag coercion and the notebook's display name."""

from omegaconf import OmegaConf

from runner.finetune_params import (
    coerce,
    explicit_finetune_keys,
    merge_finetune_params,
    pipeline_display_name,
)
from tests.conftest import compose_cfg


def test_explicit_keys_come_from_finetune_overrides_only():
    keys = explicit_finetune_keys(
        ["finetune.learning_rate=1e-5", "+finetune.lora_r=16", "finetune=lora", "model=tiny_phi3", "dry_run=true"]
    )
    assert keys == {"learning_rate", "lora_r"}


def test_tag_values_are_coerced_to_schema_types():
    assert coerce("apply_lora", "true") is True
    assert coerce("apply_deepspeed", "false") is False
    assert coerce("precision", 16) == 16 and coerce("precision", "16") == 16
    assert coerce("learning_rate", "5e-6") == 5e-6
    assert coerce("learning_rate", 1) == 1.0 and isinstance(coerce("learning_rate", 1), float)


def test_merge_order_config_then_model_defaults_then_explicit_overrides():
    cfg = compose_cfg(["experiment=phi3_ultrachat", "finetune.learning_rate=1e-4", "finetune.num_train_epochs=2"])
    defaults = OmegaConf.to_container(cfg.model.model_specific_defaults)
    params, notes = merge_finetune_params(cfg.finetune, defaults, {"learning_rate", "num_train_epochs"})
    assert params["learning_rate"] == 1e-4  # explicit override beats the model's 5e-6
    assert params["num_train_epochs"] == 2  # explicit override beats the model's 1
    assert params["precision"] == 16  # model default beats the config's 32
    assert params["save_total_limit"] == 1  # model default beats the config's -1
    assert params["apply_deepspeed"] is True and params["deepspeed_stage"] == 2
    assert "learning_rate_min" not in params and "learning_rate_max" not in params
    assert any("learning_rate_min" in n and "dropped" in n for n in notes)
    # without the explicit overrides, the model's defaults win over the experiment's values (as in the notebook)
    params, _ = merge_finetune_params(cfg.finetune, defaults, set())
    assert params["learning_rate"] == 5e-6 and params["num_train_epochs"] == 1


def test_display_name_follows_the_notebook():
    params = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "num_nodes_finetune": 2,
              "lr_scheduler_type": "linear", "apply_deepspeed": False, "deepspeed_stage": 3, "apply_lora": False,
              "save_total_limit": -1, "max_seq_length": 2048}
    assert pipeline_display_name("M", params, 4) == "M-ultrachat-bs64-linear-nods-nolora-save_limit-1-seqlen2048"
    params.update(apply_deepspeed=True, apply_lora=True)
    assert pipeline_display_name("M", params, 4) == "M-ultrachat-bs64-linear-ds3-lora-save_limit-1-seqlen2048"


def test_run_names_say_which_data_was_used():
    from runner.finetune_params import dataset_label

    assert dataset_label("HuggingFaceH4/ultrachat_200k") == "ultrachat"  # the notebook's own run names
    assert dataset_label("sample") == "sample"
    assert dataset_label("/home/me/support_chats.jsonl") == "support_chats"
    params = {"per_device_train_batch_size": 1, "apply_lora": True, "max_seq_length": 512}
    assert pipeline_display_name("M", params, 1, dataset_label("sample")).startswith("M-sample-bs1-")
