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
