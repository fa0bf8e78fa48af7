"""An out-of-memory error in the training loop ends in a RunnerError (printed without a traceback) that names the
micro-batch that was run, the memory estimate's suggestion, the keys that change it and how to resume; the
checkpoints written so far stay complete and a rerun with resume_from_checkpoint=true reaches the final step.

No GPU here: the OOM is injected as torch.cuda.OutOfMemoryError (the class exists in CPU builds of torch) from the
Trainer's training step, or from inside a checkpoint save after the Trainer wrote its files but before the
COMPLETE.json manifest."""

import pytest

from runner.errors import RunnerError
from runner.local import checkpoints
from tests.local.test_train import default_settings, write_chat_data

pytestmark = pytest.mark.slow

# 24 rows / 4 per step = 6 optimizer steps, a checkpoint at every step, two kept
SETTINGS = dict(num_train_epochs=1, per_device_train_batch_size=4, learning_rate=2e-3, max_seq_length=128,
                evaluation_strategy="disable", eval_before_training=False, logging_steps=1, save_steps=1,
                save_total_limit=2, seed=7)
FAIL_AT = 3  # the step whose work runs out of memory


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("oom_data"), n_train=24, n_eval=4)


def _oom_trainer_class(where):
    import torch
    from transformers import Trainer

    from runner.local import trainer as trainer_mod

    base = trainer_mod.make_trainer_class()

    class OomTrainer(base):
        def training_step(self, *args, **kwargs):
            if where == "step" and self.state.global_step == FAIL_AT - 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
            return super().training_step(*args, **kwargs)

        def _save_checkpoint(self, model, trial):
            if where == "save" and self.state.global_step == FAIL_AT:
                Trainer._save_checkpoint(self, model, trial)  # the files, but no manifest: cut short
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (injected)")
            return super()._save_checkpoint(model, trial)

    return OomTrainer


def _train(model_dir, data, out_dir, **extra):
    from runner.local.train import train

    params, local = default_settings(**{**SETTINGS, **extra})
    return train(model_dir=str(model_dir), train_file=str(data["train_sft"]), eval_file=None, params=params,
                 local=local, out_dir=str(out_dir), progress=False)


@pytest.mark.parametrize("where", ["step", "save"])
def test_oom_is_a_clear_error_and_the_run_resumes(tiny_model_dir, data, tmp_path, monkeypatch, where):
    from runner.local import trainer as trainer_mod

    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        cls = _oom_trainer_class(where)
        patch.setattr(trainer_mod, "make_trainer_class", lambda: cls)
        with pytest.raises(RunnerError) as info:
            _train(tiny_model_dir, data, out)
    message = str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained traceback to print

    # the micro-batch that was run, the estimate's suggestion, the knobs, how to resume
    assert "out of memory during training at step" in message
    assert "per_device_train_batch_size=4 x max_seq_length=" in message
    assert "gradient_accumulation_steps=1" in message
    assert "largest that fits without checkpointing" in message and "with checkpointing:" in message
    for knob in ("finetune.per_device_train_batch_size", "finetune.gradient_accumulation_steps",
                 "finetune.local.gradient_checkpointing=true", "finetune.local.auto_fit=true",
                 "finetune.local.max_tokens_per_batch", "finetune.max_seq_length",
                 "finetune.resume_from_checkpoint=true"):
        assert knob in message, knob

    # the checkpoints left behind: all complete, the newest is the last step finished before the OOM
    ckpt_dir = out / "checkpoints"
    left = checkpoints.list_checkpoints(ckpt_dir)
    assert left and all(checkpoints.is_complete(p) for p in left), [p.name for p in left]
    latest = checkpoints.latest_complete(ckpt_dir)
    assert checkpoints.checkpoint_step(latest) == FAIL_AT - 1
    assert str(latest) in message

    # resuming (no OOM now) reaches the final step from that checkpoint
    result = _train(tiny_model_dir, data, out, resume_from_checkpoint=True)
    assert result["resumed_from"] == str(latest)
    assert result["global_step"] == 6
    assert checkpoints.checkpoint_step(checkpoints.latest_complete(ckpt_dir)) == 6


def test_oom_message_without_a_checkpoint(tiny_model_dir, data, tmp_path, monkeypatch):
    """An OOM before the first checkpoint: the message says a rerun starts from step 0."""
    from runner.local import trainer as trainer_mod

    cls = _oom_trainer_class("step")
    monkeypatch.setattr(trainer_mod, "make_trainer_class", lambda: cls)
    with pytest.raises(RunnerError) as info:
        _train(tiny_model_dir, data, tmp_path / "out", save_steps=50)
    assert "No checkpoint was complete before the OOM" in str(info.value)
    assert "finetune.resume_from_checkpoint=true" in str(info.value)


def test_oom_in_the_eval_before_training(tiny_model_dir, data, tmp_path, monkeypatch):
    """The eval before the first step runs out of memory: the same error, naming the eval batch key too."""
    import torch

    from runner.local import trainer as trainer_mod

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB (injected)")

    monkeypatch.setattr(trainer_mod, "evaluate_loss", oom)
    params_extra = dict(evaluation_strategy="steps", eval_before_training=True)
    from runner.local.train import train

    params, local = default_settings(**{**SETTINGS, **params_extra})
    with pytest.raises(RunnerError) as info:
        train(model_dir=str(tiny_model_dir), train_file=str(data["train_sft"]), eval_file=str(data["test_sft"]),
              params=params, local=local, out_dir=str(tmp_path / "out"), progress=False)
    message = str(info.value)
    assert "in the eval before training" in message and "finetune.per_device_eval_batch_size" in message
    assert "finetune.local.auto_fit=true" in message and "No checkpoint was complete" in message
