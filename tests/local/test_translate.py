"""runner/local/translate.py: every component key lands in one named place of the local trainer (a
TrainingArguments field, a run-time decision, the recipe) or is noted as meaningless here; missing and unknown keys
are refused by name; nothing is defaulted a second time; the module stays free of torch."""

import dataclasses
import json
import subprocess
import sys

import pytest

from runner.errors import RunnerError
from runner.finetune_params import COMPONENT_KEYS
from runner.local import translate as tr
from runner.schema import FinetuneConfig, LocalFinetuneConfig
from tests.conftest import REPO
from tests.local.test_train import default_settings

# component key -> (a value that is not the schema's, the TrainingArguments field it feeds, the value expected there)
TABLE = {
    "num_train_epochs": (3, "num_train_epochs", 3.0),
    "max_steps": (17, "max_steps", 17),
    "per_device_train_batch_size": (5, "per_device_train_batch_size", 5),
    "per_device_eval_batch_size": (6, "per_device_eval_batch_size", 6),
    "gradient_accumulation_steps": (4, "gradient_accumulation_steps", 4),
    "learning_rate": (3e-4, "learning_rate", 3e-4),
    "lr_scheduler_type": ("cosine", "lr_scheduler_type", "cosine"),
    "warmup_steps": (7, "warmup_steps", 7),
    "weight_decay": (0.05, "weight_decay", 0.05),
    "adam_beta1": (0.8, "adam_beta1", 0.8),
    "adam_beta2": (0.95, "adam_beta2", 0.95),
    "adam_epsilon": (1e-6, "adam_epsilon", 1e-6),
    "optim": ("adafactor", "optim", "adafactor"),
    "max_grad_norm": (0.3, "max_grad_norm", 0.3),
    "seed": (11, "seed", 11),
    "enable_full_determinism": (True, "full_determinism", True),
    "logging_strategy": ("epoch", "logging_strategy", "epoch"),
    "logging_steps": (3, "logging_steps", 3),
    "eval_accumulation_steps": (4, "eval_accumulation_steps", 4),
    "dataloader_num_workers": (2, "dataloader_num_workers", 2),
    "auto_find_batch_size": (True, "auto_find_batch_size", True),
}


def _plan(**overrides):
    return tr.translate(*default_settings(**overrides))


def _schema_default(key):
    f = {f.name: f for f in dataclasses.fields(FinetuneConfig)}[key]
    return f.default


def test_the_table_covers_every_training_arguments_key():
    assert set(TABLE) == set(tr.TRAINING_ARGUMENTS)
    for key, (value, _, _) in TABLE.items():
        assert value != _schema_default(key), f"{key}: pick a value other than the schema's"


@pytest.mark.parametrize("key", sorted(TABLE))
def test_each_component_key_feeds_its_training_arguments_field(key):
    from transformers import TrainingArguments

    value, field, expected = TABLE[key]
    plan = _plan(**{key: value})
    assert plan.training_args[field] == expected
    assert plan.sources[key] == f"TrainingArguments.{field}"
    # the field is real, and TrainingArguments keeps the value (enums compared by their value)
    kwargs = plan.training_arguments(output_dir="/tmp/unused", eval_strategy="no", eval_steps=None, deepspeed=None,
                                     use_cpu=True, bf16=False, fp16=False)
    got = getattr(TrainingArguments(**kwargs), field)
    assert getattr(got, "value", got) == expected
    # and only that field moved off the schema's value
    base = _plan().training_args
    assert {k for k in base if base[k] != plan.training_args[k]} == {field}


def test_eval_accumulation_steps_unset_is_none():
    assert _plan(eval_accumulation_steps=-1).training_args["eval_accumulation_steps"] is None
    assert _plan(eval_accumulation_steps=0).training_args["eval_accumulation_steps"] is None


def test_every_key_has_exactly_one_place():
    tables = [set(tr.TRAINING_ARGUMENTS), set(tr.AT_RUN_TIME), set(tr.RECIPE), set(tr.NOT_LOCAL)]
    for i, a in enumerate(tables):
        for b in tables[i + 1:]:
            assert not a & b, a & b
    assert set().union(*tables) == set(COMPONENT_KEYS)
    assert set(tr.LOCAL_KEYS) == {f.name for f in dataclasses.fields(LocalFinetuneConfig)}
    plan = _plan()
    assert set(plan.sources) == set(COMPONENT_KEYS) | {f"local.{k}" for k in tr.LOCAL_KEYS}


def test_run_time_keys():
    plan = _plan(evaluation_strategy="steps", eval_steps=7)
    assert plan.eval_schedule(steps_per_epoch=40, has_eval_rows=True) == ("steps", 7)
    assert plan.eval_schedule(steps_per_epoch=40, has_eval_rows=False) == ("no", None)
    plan = _plan(evaluation_strategy="steps", eval_steps=7, evaluation_steps_interval=0.25)
    assert plan.eval_schedule(steps_per_epoch=40, has_eval_rows=True) == ("steps", 10)
    assert plan.eval_schedule(steps_per_epoch=1, has_eval_rows=True) == ("steps", 1)
    assert _plan().eval_schedule(40, True) == ("epoch", None)
    assert _plan(evaluation_strategy="disable").eval_schedule(40, True) == ("no", None)

    plan = _plan(precision=16, apply_deepspeed=True, deepspeed_stage=3, deepspeed="/x/ds.json", save_total_limit=2,
                 save_steps=9)
    assert (plan.precision, plan.apply_deepspeed, plan.deepspeed_stage, plan.deepspeed_file) == (16, True, 3,
                                                                                                 "/x/ds.json")
    assert plan.keep_checkpoints == 2 and _plan().keep_checkpoints is None
    kwargs = plan.training_arguments(output_dir="o", eval_strategy="steps", eval_steps=5, deepspeed="/run/ds.json",
                                     use_cpu=False, bf16=True, fp16=False)
    assert kwargs["save_total_limit"] is None  # rotation is the recipe's
    assert (kwargs["save_steps"], kwargs["save_strategy"]) == (9, "steps")
    assert (kwargs["eval_strategy"], kwargs["eval_steps"], kwargs["deepspeed"], kwargs["bf16"]) == (
        "steps", 5, "/run/ds.json", True)


def test_recipe_keys():
    plan = _plan(apply_lora=True, lora_r=4, lora_alpha=32, lora_dropout=0.1, lora_target_modules=["qkv_proj"],
                 lora_modules_to_save=["lm_head"], merge_lora_weights=False)
    assert plan.lora == {"r": 4, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": ["qkv_proj"],
                         "modules_to_save": ["lm_head"], "task_type": "CAUSAL_LM"}
    assert plan.apply_lora and not plan.merge_lora_weights
    assert _plan().lora is None and not _plan().apply_lora
    assert _plan(lora_modules_to_save=[], apply_lora=True).lora["modules_to_save"] is None
    plan = _plan(max_seq_length=256, pad_to_max_length=True, packing=False, max_tokens_per_batch=300,
                 max_train_rows=10, max_eval_rows=5, eval_before_training=False, ignore_mismatched_sizes=True,
                 resume_from_checkpoint=True, apply_early_stopping=True, early_stopping_patience=0,
                 early_stopping_threshold=0.5, num_gpus=2)
    assert (plan.max_seq_length, plan.pad_to_max_length, plan.packing, plan.max_tokens_per_batch) == (256, True,
                                                                                                     False, 300)
    assert (plan.max_train_rows, plan.max_eval_rows, plan.eval_before_training) == (10, 5, False)
    assert plan.ignore_mismatched_sizes and plan.resume and plan.early_stopping and plan.num_gpus == 2
    assert (plan.early_stopping_patience, plan.early_stopping_threshold) == (1, 0.5)  # patience at least 1


def test_keys_meaningless_here_are_noted_not_dropped():
    plan = _plan()
    assert set(plan.ignored) == set(tr.NOT_LOCAL) and plan.notes == []  # the schema's values: nothing to say
    assert all(plan.sources[k].startswith("not used locally") for k in tr.NOT_LOCAL)
    plan = _plan(apply_ort=True, shm_size_finetune="16g", batch_size=64)
    assert plan.ignored["apply_ort"] is True and plan.ignored["shm_size_finetune"] == "16g"
    assert len(plan.notes) == 3
    assert any("finetune.apply_ort=True is not used by the local trainer" in n for n in plan.notes)
    assert any("shm_size_finetune='16g'" in n for n in plan.notes)
    assert any("finetune.batch_size=64" in n for n in plan.notes)


def test_missing_and_unknown_keys_are_refused_by_name():
    params, local = default_settings()
    del params["learning_rate"]
    with pytest.raises(RunnerError, match="finetune.learning_rate is missing"):
        tr.translate(params, local)
    params, local = default_settings()
    with pytest.raises(RunnerError, match="finetune.learnign_rate is not a key the local trainer knows"):
        tr.translate({**params, "learnign_rate": 1e-4}, local)
    del local["save_steps"]
    with pytest.raises(RunnerError, match="finetune.local.save_steps is missing"):
        tr.translate(params, local)
    params, local = default_settings()
    with pytest.raises(RunnerError, match="finetune.local.bogus is not a key"):
        tr.translate(params, {**local, "bogus": 1})
    with pytest.raises(RunnerError, match="finetune.nope is not a key"):
        tr.destination("nope")


@pytest.mark.parametrize("overrides, device, message", [
    ({"precision": 16}, "cpu", "precision=16 needs a CUDA GPU"),
    ({"apply_deepspeed": True}, "cpu", "apply_deepspeed=true needs CUDA"),
    ({"metric_for_best_model": "f1"}, "cuda", "metric_for_best_model='f1'"),
    ({"apply_lora": True, "lora_target_modules": []}, "cpu", "needs finetune.local.lora_target_modules"),
    ({"apply_lora": True, "apply_deepspeed": True, "deepspeed_stage": 3}, "cuda", "deepspeed_stage=3"),
    ({"save_steps": 0}, "cpu", "save_steps=0 must be >= 1"),
])
def test_refusals(overrides, device, message):
    with pytest.raises(RunnerError, match=message):
        _plan(**overrides).check(device)


def test_gpu_settings_pass_on_cuda():
    _plan(precision=16, apply_deepspeed=True).check("cuda")
    _plan().check("cpu")


def test_pure_and_describable():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, json; from runner.local.translate import translate; "
                               "from tests.local.test_train import default_settings; "
                               "plan = translate(*default_settings()); plan.check('cpu'); json.dumps(plan.describe()); "
                               "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    described = _plan().describe()
    assert "params" not in described and described["training_args"]["learning_rate"] == 2e-5
    json.dumps(described)


@pytest.mark.parametrize("given, planned", [("auto", "auto"), (True, True), (False, False), ("true", True),
                                            ("FALSE", False)])
def test_gradient_checkpointing_setting(given, planned):
    plan = _plan(gradient_checkpointing=given)
    assert plan.gradient_checkpointing == planned
    common = dict(output_dir="o", eval_strategy="no", eval_steps=None, deepspeed=None, use_cpu=True, bf16=False,
                  fp16=False)
    on = planned is True or planned == "auto"
    kwargs = plan.training_arguments(**common, gradient_checkpointing=on) if on else plan.training_arguments(**common)
    if on:
        assert kwargs["activation_checkpointing"] is True
        assert kwargs["activation_checkpointing_kwargs"] == {"use_reentrant": False}
    else:
        assert "activation_checkpointing" not in kwargs  # TrainingArguments' own off, as before the key existed
    if planned is not True and planned != "auto":
        with pytest.raises(RunnerError, match="contradicts"):
            plan.training_arguments(**common, gradient_checkpointing=True)


def test_gradient_checkpointing_refuses_nonsense():
    with pytest.raises(RunnerError, match="gradient_checkpointing='maybe' must be auto, true or false"):
        _plan(gradient_checkpointing="maybe")
