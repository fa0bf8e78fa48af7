"""Kill-and-resume: a run killed mid-training (SIGKILL or SIGTERM) and started again with
resume_from_checkpoint=true ends at the same optimizer step as an uninterrupted run, from complete checkpoints
only."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from runner.local import checkpoints
from tests.conftest import REPO
from tests.local.test_train import default_settings, write_chat_data

pytestmark = pytest.mark.slow

# 48 rows / 4 per step * 2 epochs = 24 optimizer steps, a checkpoint every 4, two kept.
SETTINGS = dict(num_train_epochs=2, per_device_train_batch_size=4, learning_rate=2e-3, max_seq_length=128,
                evaluation_strategy="disable", eval_before_training=False, logging_steps=1, save_steps=4,
                save_total_limit=2, seed=7)

SCRIPT = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {repo!r})
    from runner.local.train import TrainingInterrupted, train
    from tests.local.test_train import default_settings

    params, local = default_settings(**json.loads({settings!r}))
    def slow_log(metrics, step):
        time.sleep(0.25)  # stretch each step so the signal lands mid-run
    try:
        train(model_dir={model!r}, train_file={train!r}, eval_file=None, params=params, local=local,
              out_dir={out!r}, log_fn=slow_log, progress=False)
    except TrainingInterrupted as exc:
        print("INTERRUPTED", exc, flush=True)
        sys.exit(3)
""")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_chat_data(tmp_path_factory.mktemp("resume_data"), n_train=48, n_eval=8)


def _train_in_process(model_dir, data, out_dir, **extra):
    from runner.local.train import train

    params, local = default_settings(**{**SETTINGS, **extra})
    return train(model_dir=str(model_dir), train_file=str(data["train_sft"]), eval_file=None, params=params,
                 local=local, out_dir=str(out_dir), progress=False)


def _start_and_signal(model_dir, data, out_dir, sig):
    script = Path(out_dir).parent / f"run_{sig.name}.py"
    script.write_text(SCRIPT.format(repo=str(REPO), settings=json.dumps(SETTINGS), model=str(model_dir),
                                    train=str(data["train_sft"]), out=str(out_dir)))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    first = Path(out_dir) / "checkpoints" / "checkpoint-4"
    while not checkpoints.is_complete(first):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    os.kill(proc.pid, sig)
    output, _ = proc.communicate(timeout=120)
    return proc.returncode, output


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, data, tmp_path_factory):
    return _train_in_process(tiny_model_dir, data, tmp_path_factory.mktemp("whole") / "out")


def test_sigkill_then_resume_reaches_the_same_step(tiny_model_dir, data, uninterrupted, tmp_path):
    out = tmp_path / "out"
    code, output = _start_and_signal(tiny_model_dir, data, out, signal.SIGKILL)
    assert code == -signal.SIGKILL, output[-3000:]
    assert not (out / "final_model").exists()
    latest = checkpoints.latest_complete(out / "checkpoints")
    assert latest is not None and checkpoints.checkpoint_step(latest) < uninterrupted["global_step"]
    # A half-written newer checkpoint (what a kill during a save leaves) must be ignored, not resumed from.
    broken = out / "checkpoints" / "checkpoint-22"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"\0" * 100)
    (broken / "trainer_state.json").write_text('{"global_step": 22}')

    resumed = _train_in_process(tiny_model_dir, data, out, resume_from_checkpoint=True)
    assert resumed["resumed_from"] == str(latest)
    assert resumed["ignored_incomplete_checkpoints"] == ["checkpoint-22"]
    assert resumed["global_step"] == uninterrupted["global_step"] == 24
    # the data order depends on (seed, epoch) only and the RNG/optimizer state came back: same end point
    assert resumed["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-3)
    steps = [json.loads(x)["step"] for x in open(resumed["metrics_file"]) if '"train"' in x]
    assert steps[-1] == 24 and max(steps[: steps.index(24)]) >= checkpoints.checkpoint_step(latest)


def test_sigterm_saves_a_checkpoint_and_stops_then_resumes(tiny_model_dir, data, uninterrupted, tmp_path):
    out = tmp_path / "out"
    code, output = _start_and_signal(tiny_model_dir, data, out, signal.SIGTERM)
    assert code == 3 and "INTERRUPTED stopped by SIGTERM at step" in output, output[-3000:]
    assert not (out / "final_model").exists()
    latest = checkpoints.latest_complete(out / "checkpoints")
    stopped_at = int(output.split("at step ")[1].split(";")[0])
    assert checkpoints.checkpoint_step(latest) == stopped_at < uninterrupted["global_step"]
    assert stopped_at > 4  # saved where it stopped, not only at the last save_steps checkpoint

    resumed = _train_in_process(tiny_model_dir, data, out, resume_from_checkpoint=True)
    assert resumed["resumed_from"] == str(latest)
    assert resumed["global_step"] == uninterrupted["global_step"]
    assert resumed["train_loss"] == pytest.approx(uninterrupted["train_loss"], rel=1e-3)


def test_resume_without_checkpoints_starts_fresh_and_fresh_runs_clear_old_ones(tiny_model_dir, data, tmp_path):
    out = tmp_path / "out"
    first = _train_in_process(tiny_model_dir, data, out, resume_from_checkpoint=True, max_steps=4)
    assert first["resumed_from"] is None and first["global_step"] == 4
    stale = out / "checkpoints" / "checkpoint-999"
    stale.mkdir()
    fresh = _train_in_process(tiny_model_dir, data, out, max_steps=2)
    assert fresh["resumed_from"] is None and fresh["global_step"] == 2
    assert [p.name for p in checkpoints.list_checkpoints(out / "checkpoints")] == ["checkpoint-2"]


def test_a_checkpoint_corrupted_at_the_same_size_is_skipped_when_resuming(tiny_model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    first = _train_in_process(tiny_model_dir, data, out, max_steps=8)  # checkpoints at 4 and 8
    assert first["global_step"] == 8
    newest = out / "checkpoints" / "checkpoint-8"
    weights = next(p for p in sorted(newest.iterdir()) if p.suffix == ".safetensors")
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF  # one byte of the weights changed, the size kept: a size check passes it
    weights.write_bytes(bytes(raw))
    assert checkpoints.is_complete(newest)

    resumed = _train_in_process(tiny_model_dir, data, out, max_steps=12, resume_from_checkpoint=True)
    assert resumed["resumed_from"] == str(out / "checkpoints" / "checkpoint-4")
    assert len(resumed["ignored_corrupt_checkpoints"]) == 1
    assert f"{weights.name} does not match the sha256" in resumed["ignored_corrupt_checkpoints"][0]
    assert "warning: checkpoint checkpoint-8 is corrupt" in capsys.readouterr().out
    assert resumed["global_step"] == 12


def test_a_checkpoint_counts_only_with_every_listed_file_intact(tmp_path):
    folder = tmp_path / "checkpoints" / "checkpoint-3"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 10)
    (folder / "optimizer.pt").write_bytes(b"y" * 5)
    assert not checkpoints.is_complete(folder)  # written but never marked
    checkpoints.mark_complete(folder, 3)
    assert checkpoints.is_complete(folder) and checkpoints.latest_complete(folder.parent) == folder
    (folder / "optimizer.pt").write_bytes(b"y")  # truncated
    assert not checkpoints.is_complete(folder)
    (folder / "optimizer.pt").write_bytes(b"y" * 5)
    (folder / "model.safetensors").unlink()  # half-deleted
    assert not checkpoints.is_complete(folder)
    assert checkpoints.remove_incomplete(folder.parent) == ["checkpoint-3"] and not folder.exists()

    for step in (1, 2, 3, 4):
        done = tmp_path / "checkpoints" / f"checkpoint-{step}"
        done.mkdir()
        (done / "w").write_text("w")
        checkpoints.mark_complete(done, step)
    assert checkpoints.rotate(tmp_path / "checkpoints", 2, protect="checkpoint-1") == ["checkpoint-2"]
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path / "checkpoints")] == [
        "checkpoint-1", "checkpoint-3", "checkpoint-4"]
