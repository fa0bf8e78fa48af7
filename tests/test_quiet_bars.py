"""One progress display per step: transformers' "Loading weights" / "Writing model shards" bars (and the hub's and
MLflow's) are off while the workflow's steps run, and back as they were afterwards."""

import os

from runner.quiet import MLFLOW_BARS_ENV, third_party_bars_off


def _load_and_save(model_dir, out):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(out)


def test_third_party_bars_are_off_inside_and_restored_after(tiny_model_dir, tmp_path, capfd):
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as tf_logging

    _load_and_save(tiny_model_dir, tmp_path / "a")
    shown = capfd.readouterr().err
    assert "Loading weights" in shown  # what the runner's own lines were interleaved with
    with third_party_bars_off():
        assert os.environ[MLFLOW_BARS_ENV] == "false"
        _load_and_save(tiny_model_dir, tmp_path / "b")
    quiet = capfd.readouterr().err
    assert "Loading weights" not in quiet and "Writing model shards" not in quiet
    assert tf_logging.is_progress_bar_enabled() and not hub_utils.are_progress_bars_disabled()
    assert MLFLOW_BARS_ENV not in os.environ
