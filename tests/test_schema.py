"""The schema refuses bad input before anything runs, naming the key and what is allowed."""

import os
import subprocess
import sys

import pytest
from runner.schema import ConfigError, validate
from tests.conftest import REPO, compose_cfg


def ftrun(*args, timeout=60):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize(
    "override, must_say",
    [
        ("finetune.learnign_rate=1e-5", ["learnign_rate"]),
        ("finetune.lora_r=abc", ["lora_r", "abc"]),
        ("finetune.lr_scheduler_type=cosin", ["finetune.lr_scheduler_type", "cosine", "linear"]),
        ("finetune.deepspeed_stage=4", ["finetune.deepspeed_stage", "2, 3"]),
        ("dataset.on_invalid=drop", ["dataset.on_invalid", "error, skip"]),
        ("steps=[data,train]", ["train", "connect"]),
        ("dataset.split_percent=0", ["dataset.split_percent", "(0, 100]"]),
        # `+` adds a key to a structured node without complaint from Hydra: the schema refuses it all the same
        ("+finetune.learnign_rate=1e-5", ["finetune.learnign_rate is not a config key", "finetune.learning_rate"]),
        ("+finetune.local.pakcing=false", ["finetune.local.pakcing", "finetune.local.packing"]),
        ("+seeed=3", ["seeed is not a config key", "did you mean seed"]),
    ],
)
def test_bad_override_exits_nonzero_naming_the_key(override, must_say, tmp_path):
    proc = ftrun(override, f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode != 0, proc.stdout
    message = proc.stdout + proc.stderr
    for text in must_say:
        assert text in message, message
    # nothing ran: no step record was written
    assert not (tmp_path / "run" / "run_record.json").exists()


def test_unknown_key_in_a_group_is_refused_at_compose_time():
    with pytest.raises(Exception) as info:
        compose_cfg(["finetune.learnign_rate=1e-5"])
    assert "learnign_rate" in str(info.value)


def test_wrong_type_is_refused_at_compose_time():
    with pytest.raises(Exception) as info:
        compose_cfg(["finetune.num_train_epochs=three"])
    assert "num_train_epochs" in str(info.value)


def test_validate_lists_every_problem_at_once():
    cfg = compose_cfg(["finetune.lr_scheduler_type=cosin", "finetune.deepspeed_stage=4", "finetune.precision=8"])
    with pytest.raises(ConfigError) as info:
        validate(cfg)
    text = str(info.value)
    assert "finetune.lr_scheduler_type='cosin'" in text
    assert "finetune.deepspeed_stage=4" in text
    assert "finetune.precision=8" in text and "32, 16" in text


def test_traffic_must_add_up_and_include_the_deployment():
    # Hydra keeps dicts closed: a new deployment is added with `+`
    cfg = compose_cfg(["+deployment.traffic.blue=30", "deployment.traffic.demo=60"])
    with pytest.raises(ConfigError, match="adding up to 100"):
        validate(cfg)
    cfg = compose_cfg(["+deployment.traffic.blue=100", "deployment.traffic.demo=0", "deployment.deployment_name=green"])
    with pytest.raises(ConfigError, match="deployment_name='green'"):
        validate(cfg)


def test_open_dicts_take_new_keys_and_nothing_else_does():
    from runner.schema import open_dicts

    assert {"deployment.traffic", "deployment.sample_parameters", "model.model_specific_defaults"} <= set(open_dicts())
    validate(compose_cfg(["+deployment.traffic.blue=0", "+deployment.sample_parameters.top_k=5",
                          "+model.model_specific_defaults.warmup_steps=3"]))
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(["+model.tiny.hidden=32", "+backend.wiat=false"]))
    assert "model.tiny.hidden is not a config key" in str(info.value)
    assert "backend.wiat is not a config key (did you mean backend.wait?)" in str(info.value)


def test_dataset_local_without_its_file_is_refused_before_anything_runs():
    with pytest.raises(ConfigError, match=r"dataset=local needs dataset.train_file=PATH"):
        validate(compose_cfg(["dataset=local"]))
    validate(compose_cfg(["dataset=local", "dataset.train_file=/data/chats.jsonl"]))


# ---- ranges: every numeric key has one, refused by validate() before any step ---------------------------------


@pytest.mark.parametrize("override, must_say", [
    ("finetune.weight_decay=-1", "finetune.weight_decay=-1.0 is out of range: must be >= 0"),
    ("finetune.max_grad_norm=-1", "finetune.max_grad_norm=-1.0 is out of range: must be >= 0"),
    ("finetune.lora_alpha=0", "finetune.lora_alpha=0 is out of range: must be > 0"),
    ("finetune.local.max_train_rows=-1", "finetune.local.max_train_rows=-1 is out of range: must be >= 0"),
    ("finetune.lora_r=0", "finetune.lora_r=0 is out of range: must be > 0"),
    ("finetune.max_seq_length=1", "finetune.max_seq_length=1 is out of range: must be >= 2 or -1"),
    ("finetune.warmup_steps=-10", "finetune.warmup_steps=-10 is out of range: must be >= 0"),
    ("finetune.learning_rate=nan", "finetune.learning_rate=nan is out of range: must be a finite number > 0"),
    ("finetune.learning_rate=inf", "finetune.learning_rate=inf is out of range: must be a finite number > 0"),
    ("finetune.learning_rate=0", "finetune.learning_rate=0.0 is out of range: must be > 0"),
    ("finetune.adam_beta1=2", "finetune.adam_beta1=2.0 is out of range: must be in [0, 1)"),
    ("finetune.adam_beta2=1", "finetune.adam_beta2=1.0 is out of range: must be in [0, 1)"),
    ("finetune.max_steps=-2", "finetune.max_steps=-2 is out of range: must be >= -1"),
    ("finetune.evaluation_steps_interval=1.5",
     "finetune.evaluation_steps_interval=1.5 is out of range: must be in [0, 1]"),
    ("finetune.seed=-1", "finetune.seed=-1 is out of range: must be in [0, 4294967295]"),
    ("model.tiny.hidden_size=0", "model.tiny.hidden_size=0 is out of range: must be > 0"),
    ("model.tiny.hidden_size=66", "model.tiny.hidden_size=66 must be a multiple of model.tiny.num_attention_heads=4"),
    ("dataset.eval_percent=100", "dataset.eval_percent=100.0 is out of range: must be in (0, 100)"),
    ("compute.memory_headroom=0", "compute.memory_headroom=0.0 is out of range: must be in (0, 1]"),
    ("compute.min_instances=3", "compute.min_instances=3 must be <= compute.max_instances=2"),
    ("deployment.port=70000", "deployment.port=70000 is out of range: must be in [0, 65535]"),
    ("deployment.max_batch_size=0", "deployment.max_batch_size=0 is out of range: must be > 0"),
    ("deployment.max_request_bytes=-1", "deployment.max_request_bytes=-1 is out of range: must be > 0"),
    ("deployment.request_timeout_ms=0", "deployment.request_timeout_ms=0 is out of range: must be > 0"),
    ("deployment.batch_window_ms=-1", "deployment.batch_window_ms=-1.0 is out of range: must be >= 0"),
    ("deployment.startup_timeout_s=-1", "deployment.startup_timeout_s=-1.0 is out of range: must be > 0"),
    ("deployment.instance_count=0", "deployment.instance_count=0 is out of range: must be > 0"),
    ("deployment.liveness_initial_delay=-1", "deployment.liveness_initial_delay=-1 is out of range: must be >= 0"),
    # the numeric values of the free-form dicts
    ("dataset.sample_rows.train_sft=0", "dataset.sample_rows.train_sft=0 is out of range: must be an integer >= 1"),
    ("deployment.sample_parameters.temperature=nan",
     "deployment.sample_parameters.temperature=nan is out of range: must be a number >= 0"),
    ("deployment.sample_parameters.top_p=0",
     "deployment.sample_parameters.top_p=0 is out of range: must be a number in (0, 1]"),
    ("deployment.sample_parameters.max_new_tokens=0",
     "deployment.sample_parameters.max_new_tokens=0 is out of range: must be a number >= 1"),
])
def test_a_value_out_of_its_range_is_refused_naming_the_key_and_the_range(override, must_say):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg([override]))
    assert must_say in str(info.value)


@pytest.mark.parametrize("override", [
    "finetune.learning_rate=1e10",  # a bad idea, not an impossible value: the quality gate catches the run
    "finetune.max_seq_length=-1", "finetune.max_seq_length=2", "finetune.max_steps=0", "finetune.max_grad_norm=0",
    "finetune.eval_accumulation_steps=0", "deployment.port=65535", "deployment.batch_window_ms=0",
    "finetune.adam_beta1=0",
])
def test_edges_and_special_values_in_range_pass(override):
    validate(compose_cfg([override]))


def test_every_numeric_key_of_the_schema_declares_its_range():
    """A new int/float key without a range (or a choice) fails here, so nothing numeric reaches a step unchecked."""
    import dataclasses

    from runner.schema import RunConfig

    missing = []

    def walk(schema, prefix):
        for f in dataclasses.fields(schema):
            if isinstance(f.type, type) and dataclasses.is_dataclass(f.type):
                walk(f.type, f"{prefix}{f.name}.")
            elif f.type in (int, float) and not ({"range", "choices"} & set(f.metadata)):
                missing.append(prefix + f.name)

    walk(RunConfig, "")
    assert missing == []


def test_every_default_and_preset_is_in_range():
    """The ranges refuse nothing the shipped presets use."""
    for overrides in ([], ["experiment=local_tiny"], ["experiment=phi3_ultrachat", "dry_run=true"],
                      ["experiment=phi4_ultrachat", "dry_run=true"], ["finetune=lora"], ["compute=local_gpu"]):
        validate(compose_cfg(overrides))


def test_deployment_settings_are_refused_before_any_step_runs(tmp_path):
    """Once only the deploy step checked them, after training and registering a version."""
    proc = ftrun("deployment.port=70000", "deployment.max_batch_size=0", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "deployment.port=70000 is out of range: must be in [0, 65535]" in proc.stderr
    assert "deployment.max_batch_size=0 is out of range: must be > 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "run_record.json").exists()  # no step ran


# ---- the no-+ typo gets the same "did you mean" as the + form ----------------------------------------------------


@pytest.mark.parametrize("typo, must_say", [
    ("finetune.learnign_rate=1e-5",
     "finetune.learnign_rate is not a config key (did you mean finetune.learning_rate?)"),
    ("model.tiny.hiden_size=32", "model.tiny.hiden_size is not a config key (did you mean model.tiny.hidden_size?)"),
    ("seeed=3", "seeed is not a config key (did you mean seed?)"),
])
def test_a_typo_without_plus_gets_the_same_did_you_mean_as_with_plus(typo, must_say, tmp_path):
    plain = ftrun(typo, f"hydra.run.dir={tmp_path}/plain")
    plus = ftrun("+" + typo, f"hydra.run.dir={tmp_path}/plus")
    for proc in (plain, plus):
        assert proc.returncode == 2, proc.stderr
        assert must_say in proc.stderr
        assert "Traceback" not in proc.stderr and "Could not override" not in proc.stderr
    assert not (tmp_path / "plain" / "run_record.json").exists()


def test_the_typo_check_leaves_groups_sweeps_and_hydra_keys_to_hydra():
    from runner.cli import unknown_override_keys

    assert unknown_override_keys([
        "finetune=lora", "experiment=local_tiny", "model=tiny_phi3", "finetune.learning_rate=1e-3,3e-3",
        "finetune.lora_r=choice(4,8)", "hydra.run.dir=/tmp/x", "+deployment.traffic.blue=0",
        "deployment.traffic.demo=100", "model.model_specific_defaults.warmup_steps=3", "--cfg", "job", "-m",
        "steps=[data]", "hparams_search=optuna_lr_rank", "~from_run",
    ]) == []
    assert unknown_override_keys(["-m", "finetune.learnign_rate=1e-3,3e-3"]) == [
        "finetune.learnign_rate is not a config key (did you mean finetune.learning_rate?); only these dicts take "
        "new keys: model.model_specific_defaults, dataset.sample_rows, deployment.traffic, "
        "deployment.sample_parameters"]
