"""The recipe's phases: setup → train → save, cleanup always (after a failure or an interruption too); train()
runs the recipe in one process and never launches torchrun itself."""

import signal

import pytest

from runner.errors import RunnerError
from runner.local import recipe as recipe_mod
from runner.local import train as train_mod
from runner.local.recipe import LocalRecipe, run_recipe
from tests.local.test_train import chat_data, default_settings, run_train  # noqa: F401  (chat_data: a fixture)


class FakeRecipe:
    def __init__(self, fail_in=None, exc=RuntimeError):
        self.calls = []
        self.fail_in = fail_in
        self.exc = exc

    def _phase(self, name):
        self.calls.append(name)
        if name == self.fail_in:
            raise self.exc(f"{name} failed")

    def setup(self):
        self._phase("setup")

    def train(self):
        self._phase("train")

    def save(self):
        self._phase("save")
        return {"saved": True}

    def cleanup(self):
        self.calls.append("cleanup")


def test_phases_run_in_order():
    fake = FakeRecipe()
    assert run_recipe(fake) == {"saved": True}
    assert fake.calls == ["setup", "train", "save", "cleanup"]


@pytest.mark.parametrize("fail_in, exc", [("setup", RuntimeError), ("train", RuntimeError), ("save", OSError),
                                          ("train", train_mod.TrainingInterrupted)])
def test_cleanup_runs_after_a_failure(fail_in, exc):
    fake = FakeRecipe(fail_in, exc)
    with pytest.raises(exc, match=f"{fail_in} failed"):
        run_recipe(fake)
    order = ["setup", "train", "save"]
    assert fake.calls == order[:order.index(fail_in) + 1] + ["cleanup"]


def test_train_never_launches(monkeypatch, tmp_path):
    # Two GPUs seen: the settings need torchrun workers, which only the caller starts; nothing is loaded first.
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(train_mod, "_cuda_count", lambda: 2)
    launched = []
    from runner.local import distributed

    monkeypatch.setattr(distributed, "launch", lambda *a, **k: launched.append(a))
    params, local = default_settings()
    with pytest.raises(RunnerError, match="2 torchrun worker.*distributed.launch"):
        train_mod.train(model_dir=str(tmp_path / "no-model"), train_file=str(tmp_path / "x"), eval_file=None,
                        params=params, local=local, out_dir=str(tmp_path / "out"), device="cuda")
    assert not launched and not (tmp_path / "out").exists()


def _spy_phases(monkeypatch):
    calls = []
    for name in ("setup", "train", "save", "cleanup"):
        original = getattr(LocalRecipe, name)

        def spy(self, _original=original, _name=name):
            calls.append(_name)
            return _original(self)

        monkeypatch.setattr(LocalRecipe, name, spy)
    return calls


@pytest.mark.slow
def test_the_local_recipe_runs_its_phases_in_order(tiny_model_dir, chat_data, tmp_path, monkeypatch):  # noqa: F811
    calls = _spy_phases(monkeypatch)
    result = run_train(tiny_model_dir, chat_data, tmp_path / "run", max_steps=2, max_seq_length=128,
                       evaluation_strategy="disable", eval_before_training=False)
    assert calls == ["setup", "train", "save", "cleanup"]
    assert result["global_step"] == 2 and result["final_model_dir"]
    assert result["ignored_params"] == {"apply_ort": False, "shm_size_finetune": "5g", "num_nodes_finetune": 1,
                                        "batch_size": 1000}


@pytest.mark.slow
def test_cleanup_after_a_failing_loop_restores_handlers_and_frees_the_trainer(tiny_model_dir, chat_data,  # noqa: F811
                                                                               tmp_path, monkeypatch):
    from transformers import Trainer
    from transformers.utils import logging as hf_logging

    calls = _spy_phases(monkeypatch)
    recipes = []
    original_init = LocalRecipe.__init__

    def keep(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        recipes.append(self)

    monkeypatch.setattr(LocalRecipe, "__init__", keep)

    def broken_train(self, *args, **kwargs):
        assert signal.getsignal(signal.SIGTERM) is not before_term  # our handler is installed during the loop
        assert not hf_logging.is_progress_bar_enabled()
        raise RuntimeError("the loop broke")

    monkeypatch.setattr(Trainer, "train", broken_train)
    before_term = signal.getsignal(signal.SIGTERM)
    bars_before = hf_logging.is_progress_bar_enabled()
    with pytest.raises(RuntimeError, match="the loop broke"):
        run_train(tiny_model_dir, chat_data, tmp_path / "run", max_steps=2, max_seq_length=128,
                  evaluation_strategy="disable", eval_before_training=False)
    assert calls == ["setup", "train", "cleanup"]
    assert signal.getsignal(signal.SIGTERM) is before_term
    assert hf_logging.is_progress_bar_enabled() == bars_before
    assert recipes[0].trainer is None and recipes[0].model is None
    assert not (tmp_path / "run" / "final_model").exists()


def test_recipe_module_is_what_train_runs():
    assert train_mod.train.__module__ == "runner.local.train" and recipe_mod.run_recipe is run_recipe


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_trains_the_same_packed_model(tiny_model_dir, chat_data, tmp_path, lora):  # noqa: F811
    # The recomputed forward in backward must see each conversation alone, as the first forward did.
    settings = dict(max_steps=3, per_device_train_batch_size=8, learning_rate=3e-3, max_seq_length=128,
                    evaluation_strategy="steps", eval_steps=3, eval_before_training=False, logging_steps=1,
                    apply_lora=lora, lora_alpha=16)
    off = run_train(tiny_model_dir, chat_data, tmp_path / "off", gradient_checkpointing=False, **settings)
    on = run_train(tiny_model_dir, chat_data, tmp_path / "on", gradient_checkpointing=True, **settings)
    assert (off["gradient_checkpointing"], on["gradient_checkpointing"]) == (False, True)
    assert on["packing"] and on["global_step"] == 3
    assert on["train_loss"] == pytest.approx(off["train_loss"], rel=1e-4)
    assert on["eval_loss"] == pytest.approx(off["eval_loss"], rel=1e-4)
    auto = run_train(tiny_model_dir, chat_data, tmp_path / "auto", **settings)  # a tiny model fits: off
    assert auto["gradient_checkpointing"] is False
