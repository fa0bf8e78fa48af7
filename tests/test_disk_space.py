"""Large writes of known size are refused up front with both figures when the disk cannot hold them."""

import shutil
from collections import namedtuple

import pytest

from runner import disk_space
from runner.disk_space import NotEnoughSpace

Usage = namedtuple("Usage", "total used free")


def _free(monkeypatch, free: int):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - free, free))


def test_refused_with_both_figures(tmp_path, monkeypatch):
    _free(monkeypatch, 2 * 10**8)
    with pytest.raises(NotEnoughSpace, match=r"needs about 1\.10 GB, 0\.20 GB are free") as err:
        disk_space.ensure_free(tmp_path, 10**9, "checkpoint-10")
    assert str(tmp_path) in str(err.value) and "checkpoint-10" in str(err.value)
    disk_space.ensure_free(tmp_path, 10**8, "checkpoint-10")  # fits: no refusal


def test_final_model_save_is_refused_before_writing(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runner.local.trainer import save_final as _save_final

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    needed = disk_space.tensor_bytes(model)
    assert needed > 10**6  # ~344k fp32 parameters
    _free(monkeypatch, needed // 2)
    with pytest.raises(NotEnoughSpace, match="final model"):
        _save_final(model, tokenizer, tmp_path, apply_lora=False, merge_lora_weights=True)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_checkpoint_size_is_the_last_checkpoints(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "optimizer.pt").write_bytes(b"x" * 12345)
    assert disk_space.checkpoint_bytes(None, tmp_path) == 12345
