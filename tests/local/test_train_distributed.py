"""DeepSpeed config generation and the multi-GPU launch (generated here; run where GPUs are)."""

import json
import sys

import pytest

from runner.errors import RunnerError
from runner.local import distributed


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_config_for_each_stage(stage, tmp_path):
    path = distributed.write_deepspeed_config(tmp_path, {"apply_deepspeed": True, "deepspeed_stage": stage,
                                                         "deepspeed": None})
    config = json.loads(open(path).read())
    assert path.endswith("deepspeed_config.json")
    assert config["zero_optimization"]["stage"] == stage
    # the Trainer fills these from the finetune keys, so they cannot disagree with them
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto"
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    zero = config["zero_optimization"]
    if stage == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
        assert zero["stage3_prefetch_bucket_size"] == "auto"
    else:
        assert "stage3_prefetch_bucket_size" not in zero and zero["reduce_scatter"] is True


def test_deepspeed_config_from_the_users_file_or_none(tmp_path):
    assert distributed.write_deepspeed_config(tmp_path, {"apply_deepspeed": False}) is None
    user = tmp_path / "mine.json"
    user.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    path = distributed.write_deepspeed_config(tmp_path / "out", {"apply_deepspeed": True, "deepspeed": str(user)})
    assert json.loads(open(path).read()) == {"zero_optimization": {"stage": 1}}
    with pytest.raises(RunnerError, match="finetune.deepspeed=.*no such file"):
        distributed.write_deepspeed_config(tmp_path, {"apply_deepspeed": True, "deepspeed": str(tmp_path / "x")})
    with pytest.raises(RunnerError, match="deepspeed_stage=1"):
        distributed.deepspeed_config(1)


def test_launch_command_and_when_to_launch(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cmd = distributed.launch_command(4, tmp_path / "launch_spec.json")
    assert cmd == [sys.executable, "-m", "runner.local.distributed", "--torchrun", "--standalone", "--nproc_per_node=4",
                   "-m", "runner.local.distributed", str(tmp_path / "launch_spec.json")]
    off = {"apply_deepspeed": False}
    assert distributed.processes_needed(off, {"num_gpus": 0}, "cpu", 0) == 0
    assert distributed.processes_needed(off, {"num_gpus": 0}, "cuda", 1) == 0  # one GPU: in-process
    assert distributed.processes_needed(off, {"num_gpus": 0}, "cuda", 4) == 4  # 0 = all visible
    assert distributed.processes_needed(off, {"num_gpus": 2}, "cuda", 4) == 2
    assert distributed.processes_needed({"apply_deepspeed": True}, {"num_gpus": 0}, "cuda", 1) == 1
    with pytest.raises(RunnerError, match="num_gpus=8 but only 4"):
        distributed.processes_needed(off, {"num_gpus": 8}, "cuda", 4)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed.processes_needed(off, {"num_gpus": 0}, "cuda", 4) == 0  # a worker never relaunches

    spec = distributed.write_launch_spec(tmp_path, {"model_dir": "m", "params": {"seed": 1}})
    assert json.loads(spec.read_text()) == {"model_dir": "m", "params": {"seed": 1}}


def test_launch_runs_the_command_and_returns_rank0_result(tmp_path, monkeypatch):
    """The launcher's plumbing with torchrun replaced by a stand-in that writes what rank 0 would."""
    calls = []

    def fake_run(cmd):
        calls.append(cmd)
        metrics = tmp_path / "metrics.jsonl"
        metrics.write_text(json.dumps({"step": 3, "kind": "train", "time": 1.0, "train_loss": 2.5}) + "\n"
                           + json.dumps({"step": 3, "kind": "summary", "time": 2.0, "global_step": 3}) + "\n")
        (tmp_path / "result.json").write_text(json.dumps({"global_step": 3, "metrics_file": str(metrics)}))

        class Done:
            returncode = 0
        return Done()

    monkeypatch.setattr(distributed.subprocess, "run", fake_run)
    logged = []
    result = distributed.launch(2, tmp_path, {"out_dir": str(tmp_path)}, log_fn=lambda m, s: logged.append((m, s)))
    assert result["global_step"] == 3
    assert calls[0][5] == "--nproc_per_node=2" and calls[0][-1].endswith("launch_spec.json")
    # metrics replayed to log_fn after the workers finish; the summary is not, as in a single-process run
    assert logged == [({"train_loss": 2.5}, 3)]


@pytest.mark.slow
def test_a_workers_runner_error_reaches_the_launcher_as_itself(tmp_path, tiny_model_dir, capfd):
    """A real torchrun launch (one CPU worker) whose train() ends in a RunnerError: the launcher raises that
    message (an OOM's advice takes this path), not "exit 1"; the worker prints it without a traceback."""
    from tests.local.test_train import default_settings

    train_file = tmp_path / "train.jsonl"
    train_file.write_text("")  # no conversation to train on: a RunnerError in setup, after the tokenizer loads
    params, local = default_settings()
    out_dir = tmp_path / "out"
    (out_dir / distributed.ERROR_FILE.format(rank=3)).parent.mkdir(parents=True)
    (out_dir / distributed.ERROR_FILE.format(rank=3)).write_text('{"rank": 3, "message": "stale"}')
    kwargs = dict(model_dir=str(tiny_model_dir), train_file=str(train_file), eval_file=None, params=params,
                  local=local, out_dir=str(out_dir), device="cpu", progress=False)
    with pytest.raises(RunnerError) as err:
        distributed.launch(1, out_dir, kwargs)
    assert str(err.value) == f"{train_file}: no conversation with an assistant turn left to train on (rank 0 of " \
                             f"the torchrun launch)"
    assert [p.name for p in out_dir.glob("worker_error-*")] == ["worker_error-0.json"]  # the stale one is gone
    printed = capfd.readouterr().err
    assert f"rank 0: {train_file}: no conversation" in printed
    assert "torchrun: worker(s) failed: rank 0 exit 1" in printed
    assert "Traceback" not in printed and "ChildFailedError" not in printed


def test_worker_errors_merge_into_one_message(tmp_path):
    assert distributed.read_worker_errors(tmp_path) is None
    oom = RunnerError("CUDA out of memory; lower finetune.per_device_train_batch_size")
    for rank in (1, 0):
        distributed.write_worker_error(tmp_path, rank, oom)
    assert distributed.read_worker_errors(tmp_path) == f"{oom} (rank 0, 1 of the torchrun launch)"
    distributed.write_worker_error(tmp_path, 2, RunnerError("bad data"))
    assert distributed.read_worker_errors(tmp_path) == (f"the torchrun workers failed:\n  rank 0, 1: {oom}\n"
                                                        f"  rank 2: bad data")


# ---- the launch is decided by the local backend's finetune step, not by train() ----------------------------------

class _Record:
    def __init__(self, outputs):
        self.outputs = outputs
        self.data = {"config_sha256": "sha"}

    def output(self, step, key=None):
        out = self.outputs.get(step, {})
        return out if key is None else out.get(key)


def _finetune_step(tmp_path, monkeypatch, device, cuda_count, overrides=(), calls=None):
    from types import SimpleNamespace

    from runner.local import compute, tracking
    from runner.local import train as train_mod
    from runner.local.backend import LocalBackend
    from tests.conftest import compose_cfg

    said, calls = [], ({} if calls is None else calls)
    ctx = SimpleNamespace(
        record=_Record({"data": {"train_file": str(tmp_path / "train.jsonl"), "test_file": str(tmp_path / "t.jsonl"),
                                 "manifest_sha256": "m"},
                        "model": {"model_dir": str(tmp_path / "model")}, "compute": {"device": device}}),
        say=said.append, display_name=lambda name: name, explicit_finetune_keys=set(), run_dir=tmp_path,
        task_overrides=[], tracking_tags=lambda: {})
    monkeypatch.setattr(tracking, "start_run", lambda **kw: calls.setdefault("start_run", kw) and "run-1")
    monkeypatch.setattr(tracking, "log_artifact", lambda *a, **k: None)
    monkeypatch.setattr(tracking, "end_run", lambda *a, **k: calls.setdefault("end_run", k))
    monkeypatch.setattr(tracking, "metric_logger", lambda *a: "LOG_FN")
    monkeypatch.setattr(compute, "cuda_device_count", lambda: cuda_count)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    figures = {"global_step": 3, "eval_loss_before": 2.0, "eval_loss": 1.0, "tokens_per_s": 10.0}

    def fake_launch(nproc, out_dir, kwargs, log_fn=None):
        calls["launch"] = (nproc, out_dir, kwargs, log_fn)
        return dict(figures)

    def fake_train(**kwargs):
        calls["train"] = kwargs
        return dict(figures)

    monkeypatch.setattr(distributed, "launch", fake_launch)
    monkeypatch.setattr(train_mod, "train", fake_train)
    result = LocalBackend(compose_cfg(list(overrides))).finetune(ctx)
    return result, calls, said


def test_finetune_step_launches_torchrun_for_several_gpus(tmp_path, monkeypatch):
    result, calls, said = _finetune_step(tmp_path, monkeypatch, "cuda", 2)
    nproc, out_dir, kwargs, log_fn = calls["launch"]
    assert nproc == 2 and "train" not in calls and log_fn == "LOG_FN"
    assert kwargs["device"] == "cuda" and kwargs["out_dir"] == str(out_dir) and "log_fn" not in kwargs
    json.dumps(kwargs)  # the launch spec: every worker calls train(**kwargs)
    assert kwargs["params"]["learning_rate"] > 0 and "num_gpus" in kwargs["local"]
    assert "training in 2 torchrun worker(s)" in said and result["global_step"] == 3


def test_finetune_step_trains_in_process_on_one_device(tmp_path, monkeypatch):
    result, calls, said = _finetune_step(tmp_path, monkeypatch, "cpu", 0, ["finetune.apply_ort=true"])
    assert "launch" not in calls and calls["train"]["log_fn"] == "LOG_FN" and calls["train"]["device"] == "cpu"
    assert any("finetune.apply_ort=True is not used by the local trainer" in s for s in said)
    assert any("apply_ort" in n for n in result["param_notes"])


def test_finetune_step_refuses_before_opening_a_run(tmp_path, monkeypatch):
    calls = {}
    with pytest.raises(RunnerError, match="precision=16 needs a CUDA GPU"):
        _finetune_step(tmp_path, monkeypatch, "cpu", 0, ["finetune.precision=16"], calls=calls)
    assert calls == {}  # no MLflow run opened, nothing trained or launched


def test_finetune_step_runs_what_the_compute_step_decided(tmp_path, monkeypatch):
    original = _Record.output

    def with_decision(self, step, key=None):
        if step == "compute":
            out = {"device": "cpu", "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4,
                   "gradient_checkpointing": True}
            return out if key is None else out.get(key)
        return original(self, step, key)

    monkeypatch.setattr(_Record, "output", with_decision)
    result, calls, said = _finetune_step(tmp_path, monkeypatch, "cpu", 0)
    kwargs = calls["train"]
    assert kwargs["params"]["per_device_train_batch_size"] == 2 and kwargs["params"]["gradient_accumulation_steps"] == 4
    assert kwargs["local"]["gradient_checkpointing"] is True
    assert any(n.startswith("per_device_train_batch_size: ") and "-> 2 (compute step" in n
               for n in result["param_notes"])
