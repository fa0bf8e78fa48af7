"""Merge order, tag coercion and the notebook's display name."""

import pytest
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


# ---- decided once per run -------------------------------------------------------------------------------------


def test_the_decision_says_where_each_value_came_from_and_cannot_be_changed():
    import dataclasses

    import pytest

    from runner.finetune_params import EffectiveFinetuneParams, decide_finetune_params

    cfg = compose_cfg(["experiment=phi3_ultrachat"])
    decided = decide_finetune_params(cfg.finetune, OmegaConf.to_container(cfg.model.model_specific_defaults),
                                     {"learning_rate"})
    assert decided.sources["learning_rate"] == "override"  # explicit: the model's 5e-6 does not win
    assert decided.sources["precision"] == "model_specific_defaults" and decided.values["precision"] == 16
    assert decided.sources["seed"] == "config"
    assert any("learning_rate_min" in n and "dropped" in n for n in decided.notes)
    with pytest.raises(dataclasses.FrozenInstanceError):
        decided.values = {}
    with pytest.raises(TypeError):  # a read-only view: a consumer adjusts its own copy (params())
        decided.values["learning_rate"] = 1.0
    copy = decided.params()
    copy["learning_rate"] = 1.0
    assert decided.values["learning_rate"] != 1.0
    assert EffectiveFinetuneParams.from_record(decided.to_record()) == decided


def _count_merges(monkeypatch) -> list:
    """Spy on the one merge function: each call is appended (and still merges)."""
    import runner.finetune_params as fp

    calls, real = [], fp.merge_finetune_params
    monkeypatch.setattr(fp, "merge_finetune_params", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def test_an_azure_run_of_every_step_merges_the_finetune_params_once(tmp_path, monkeypatch):
    """connect..cleanup through the real workflow against the MLClient double: compute's memory check, the
    pipeline job and the register step's gate all read the one decision, which the record keeps."""
    from runner.azureml.backend import AzureMLBackend
    from runner.record import load_record
    from runner.workflow import run
    from tests.azureml.double import AzureWorld
    from tests.azureml.test_backend import TIMESTAMP
    from tests.azureml.test_workflow import NO_DATA_STEPS, compose, earlier_run_with_data, finished_job_in_a_file_store

    uri, job_name = finished_job_in_a_file_store(tmp_path, monkeypatch)
    data_run, _ = earlier_run_with_data(tmp_path)
    calls = _count_merges(monkeypatch)
    cfg, overrides = compose(tmp_path, NO_DATA_STEPS, f"from_run={data_run}", "finetune.num_train_epochs=2")
    world = AzureWorld(job_name=job_name, tracking_uri=uri)
    run(cfg, run_dir=tmp_path / "run", task_overrides=overrides,
        backend=AzureMLBackend(cfg, clients=world.clients(), clock=lambda: TIMESTAMP))

    assert len(calls) == 1
    saved = load_record(tmp_path / "run")
    assert saved["steps"]["register"]["status"] == "ok"
    decided = saved["finetune_params"]
    assert decided["values"] == saved["steps"]["finetune"]["outputs"]["effective_params"]
    assert decided["sources"]["num_train_epochs"] == "override" and decided["values"]["num_train_epochs"] == 2
    assert decided["explicit_keys"] == ["num_train_epochs"]


def test_a_local_run_merges_once_for_the_compute_checks_and_the_plan_once(tmp_path, monkeypatch, tiny_model_dir):
    from runner.record import load_record
    from runner.workflow import run

    calls = _count_merges(monkeypatch)
    overrides = ["model=tiny_phi3", f"model.local_path={tiny_model_dir}", "steps=[connect,model,compute]",
                 "finetune.learning_rate=1e-3"]
    run(compose_cfg(overrides), run_dir=tmp_path / "run", task_overrides=overrides)
    assert len(calls) == 1  # the model step decides; the compute step's memory check reads it
    saved = load_record(tmp_path / "run")
    assert saved["finetune_params"]["values"]["learning_rate"] == 1e-3
    assert saved["finetune_params"]["sources"]["learning_rate"] == "override"

    calls.clear()
    run(compose_cfg(["dry_run=true"]), run_dir=tmp_path / "plan")
    assert len(calls) == 1


@pytest.mark.slow
def test_a_local_fine_tune_merges_once_and_translates_once_for_the_check_and_once_for_the_trainer(
        tmp_path, monkeypatch, tiny_model_dir):
    """Through finetune on the tiny model (one optimizer step): one merge; the compute step's refusal check and the
    finetune step each translate once, and train() takes the finetune step's plan instead of translating again."""
    import runner.local.translate as translate_module
    from runner.record import load_record
    from runner.workflow import run

    merges = _count_merges(monkeypatch)
    translations, real = [], translate_module.translate
    monkeypatch.setattr(translate_module, "translate", lambda *a, **k: translations.append(a) or real(*a, **k))
    overrides = ["model=tiny_phi3", f"model.local_path={tiny_model_dir}",
                 "steps=[connect,model,compute,data,finetune]", "finetune.max_steps=1",
                 "finetune.evaluation_strategy=disable", "finetune.local.eval_before_training=false",
                 "finetune.learning_rate=1e-3"]
    run(compose_cfg(overrides), run_dir=tmp_path / "run", task_overrides=overrides)
    saved = load_record(tmp_path / "run")
    assert saved["steps"]["finetune"]["outputs"]["global_step"] == 1
    assert len(merges) == 1
    assert len(translations) == 2, len(translations)
    assert translations[0][0]["learning_rate"] == translations[1][0]["learning_rate"] == 1e-3


def test_the_register_gate_reads_the_decision_of_the_run_that_fine_tuned(tmp_path):
    """steps=[register] from_run=<a run that decided>: the gate's settings are that run's decision, not merged
    again (and no backend is asked)."""
    from types import SimpleNamespace

    from runner.finetune_params import decide_finetune_params, recorded_decision
    from runner.record import RunRecord
    from runner.steps.register import _training_params

    cfg = compose_cfg(["finetune.max_steps=0"])
    earlier_decision = decide_finetune_params(cfg.finetune, {}, {"max_steps"})
    earlier = {"run_dir": "/earlier", "finetune_params": earlier_decision.to_record(),
               "steps": {"finetune": {"status": "ok", "outputs": {"job_name": "j"}}}}
    (tmp_path / "run").mkdir()
    record = RunRecord(tmp_path / "run", backend="x", config_sha256="x", earlier=earlier)
    assert recorded_decision(record) == earlier_decision

    class NoDecisions:
        def training_params(self, ctx):
            return None

        def finetune_params(self, ctx):
            raise AssertionError("decided again")

    ctx = SimpleNamespace(record=record, cfg=compose_cfg([]), finetune_params=None, explicit_finetune_keys=set())
    assert _training_params(ctx, NoDecisions())["max_steps"] == 0
