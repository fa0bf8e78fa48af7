"""The runner's pipeline inputs against the real chat_completion_pipeline spec: coercion, dropping, refusals, and
the component itself (azure.ai.ml.load_component) called with them for every finetune preset."""

import json

import pytest
import yaml

from runner.azureml.spec import coerce_input, load_spec, prepare_inputs, spec_from_dict
from runner.azureml.tags import facts_from_config
from runner.finetune_params import merge_finetune_params
from runner.schema import ConfigError
from tests.azureml.double import PHI3_SPEC, PIPELINE_SPEC
from tests.conftest import compose_cfg

PRESETS = ["default", "lora", "lora_deepspeed2", "full_deepspeed3"]


@pytest.fixture(scope="module")
def spec():
    return load_spec(str(PIPELINE_SPEC))


@pytest.fixture(scope="module")
def component():
    from azure.ai.ml import load_component

    return load_component(source=str(PIPELINE_SPEC))


def runner_kwargs(cfg, spec, explicit=()):
    from runner.azureml.translate import pipeline_inputs

    facts = facts_from_config(cfg.model)
    defaults = facts.model_specific_defaults if cfg.model.apply_model_specific_defaults else {}
    params, _ = merge_finetune_params(cfg.finetune, defaults, explicit)
    inputs, _ = prepare_inputs(params, spec, explicit)
    return pipeline_inputs(model_id=facts.asset_id, cluster=cfg.compute.name, train_file="/d/train_sft.jsonl",
                           test_file="/d/test_sft.jsonl", gpus_per_node=cfg.compute.gpus_per_node or 1,
                           finetune_inputs=inputs, spec=spec)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_calls_the_real_component(preset, spec, component):
    from runner.azureml.translate import build_pipeline_job

    cfg = compose_cfg(["experiment=phi3_ultrachat", f"finetune={preset}", "model.apply_model_specific_defaults=false"])
    kwargs = runner_kwargs(cfg, spec)
    job = build_pipeline_job(component, kwargs, display_name=f"preset-{preset}", force_rerun=True,
                             continue_on_step_failure=False)
    assert job._validate().passed
    node = job._to_dict()["jobs"]["chat_completion_pipeline"]["inputs"]
    ft = cfg.finetune
    assert node["apply_lora"] == ("true" if ft.apply_lora else "false")
    assert node["apply_deepspeed"] == ("true" if ft.apply_deepspeed else "false")
    assert node["deepspeed_stage"] == str(ft.deepspeed_stage) and node["precision"] == str(ft.precision)
    for key, value in node.items():  # every value the runner passes is one the spec accepts
        decl = spec.inputs[key]
        if decl.enum is not None:
            assert value in decl.enum, (key, value)
    # and the component refuses anything it does not declare
    from azure.ai.ml.exceptions import UnexpectedKeywordError

    with pytest.raises(UnexpectedKeywordError, match="learning_rate_min"):
        build_pipeline_job(component, {**kwargs, "learning_rate_min": 5e-7}, display_name="x", force_rerun=True,
                           continue_on_step_failure=False)


def test_passing_the_model_tags_raw_hits_the_seed_hazard(component):
    """What the notebook does with Phi-3's model_specific_defaults: learning_rate_min/max are not inputs."""
    from azure.ai.ml.exceptions import UnexpectedKeywordError

    tags = yaml.safe_load(PHI3_SPEC.read_text())
    with pytest.raises(UnexpectedKeywordError):
        component(**tags["tags"]["model_specific_defaults"])


def test_flags_and_string_enums_are_coerced(spec):
    assert coerce_input("apply_lora", True, spec.inputs["apply_lora"]) == "true"
    assert coerce_input("apply_lora", "False", spec.inputs["apply_lora"]) == "false"
    assert coerce_input("precision", 16, spec.inputs["precision"]) == "16"
    assert coerce_input("deepspeed_stage", 3, spec.inputs["deepspeed_stage"]) == "3"
    assert coerce_input("learning_rate", "5e-6", spec.inputs["learning_rate"]) == pytest.approx(5e-6)
    assert coerce_input("num_train_epochs", "2", spec.inputs["num_train_epochs"]) == 2
    assert coerce_input("lr_scheduler_type", "cosine", spec.inputs["lr_scheduler_type"]) == "cosine"


@pytest.mark.parametrize("key,value,match", [
    ("precision", 8, r"allowed values \['32', '16'\]"),
    ("apply_lora", "yes", "'true' or 'false'"),
    ("num_train_epochs", 0, "below the component's minimum 1"),
    ("num_train_epochs", 1.5, "wants an integer"),
    ("learning_rate", "fast", "wants a number"),
])
def test_values_the_component_refuses(spec, key, value, match):
    with pytest.raises(ConfigError, match=match):
        coerce_input(key, value, spec.inputs[key])


def test_keys_not_in_the_spec_are_dropped_unless_explicit(spec):
    params = {"learning_rate": 1e-5, "packing_ratio": 2, "deepspeed": None}
    inputs, notes = prepare_inputs(params, spec)
    assert inputs == {"learning_rate": 1e-5}  # None (optional, unset) is left to the component's default
    assert notes == ["finetune.packing_ratio left out: not an input of chat_completion_pipeline 0.0.82"]
    with pytest.raises(ConfigError, match=r"finetune.learnig_rate is not an input .* did you mean 'learning_rate'"):
        prepare_inputs({"learnig_rate": 1e-5}, spec, explicit_keys={"learnig_rate"})


def test_merge_order_config_then_model_defaults_then_explicit(spec):
    """The notebook's experiment says num_train_epochs=3; Phi-3's defaults say 1 and win; an explicit override
    (finetune.num_train_epochs=3 on the command line) wins over both."""
    cfg = compose_cfg(["experiment=phi3_ultrachat"])
    facts = facts_from_config(cfg.model)
    params, notes = merge_finetune_params(cfg.finetune, facts.model_specific_defaults, set())
    inputs, _ = prepare_inputs(params, spec)
    assert inputs["num_train_epochs"] == 1 and inputs["precision"] == "16" and inputs["save_total_limit"] == 1
    assert "num_train_epochs: 3 -> 1 (model_specific_defaults)" in notes

    cfg = compose_cfg(["experiment=phi3_ultrachat", "finetune.num_train_epochs=3", "finetune.precision=32"])
    explicit = {"num_train_epochs", "precision"}
    params, notes = merge_finetune_params(cfg.finetune, facts.model_specific_defaults, explicit)
    inputs, _ = prepare_inputs(params, spec, explicit)
    assert inputs["num_train_epochs"] == 3 and inputs["precision"] == "32"
    assert inputs["learning_rate"] == pytest.approx(5e-6) and inputs["apply_lora"] == "true"
    assert any(n.startswith("num_train_epochs: your override 3 wins") for n in notes)


def test_a_spec_exported_from_a_registry(tmp_path, spec):
    """`az ml component show -o json` output: extra top-level fields, string defaults/min; and the REST shape."""
    raw = yaml.safe_load(PIPELINE_SPEC.read_text())
    exported = {**raw, "id": "azureml://registries/azureml/components/chat_completion_pipeline/versions/0.0.82",
                "creation_context": {"created_at": "2026-06-30T00:00:00Z", "created_by": "azureml"},
                "is_anonymous": False}
    for decl in exported["inputs"].values():
        for key in ("default", "min"):
            if key in decl:
                decl[key] = str(decl[key])
    path = tmp_path / "exported.json"
    path.write_text(json.dumps(exported))
    loaded = load_spec(str(path))
    assert loaded.asset_id.endswith("/versions/0.0.82")
    assert set(loaded.inputs) == set(spec.inputs)
    assert loaded.inputs["num_train_epochs"].min == 1
    with pytest.raises(ConfigError, match="minimum"):
        coerce_input("num_train_epochs", 0, loaded.inputs["num_train_epochs"])
    rest = spec_from_dict({"id": "x", "properties": {"componentSpec": raw}}, "rest")
    assert set(rest.inputs) == set(spec.inputs)


def test_not_a_spec_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    with pytest.raises(ConfigError, match="no `inputs` mapping"):
        load_spec(str(bad))
    with pytest.raises(ConfigError, match="backend.component_spec=.*no such file"):
        load_spec(str(tmp_path / "missing.yaml"))
