"""The typed step results that later steps and the backends read instead of string keys: the record's on-disk
shape unchanged, this run's result before from_run's, and a missing earlier step one clear MissingInput."""

import json

import pytest

from runner.errors import MissingInput
from runner.record import RunRecord
from runner.step_results import ComputeResult, DataResult, FinetuneResult, ModelResult, RegisterResult


def _record(tmp_path, earlier=None) -> RunRecord:
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    return RunRecord(run_dir, backend="local", config_sha256="x", earlier=earlier)


def test_a_result_writes_back_exactly_what_the_backend_reported():
    reported = {"display_name": "d", "mlflow_run_id": "r1", "final_model_dir": "/m", "training_key": "k",
                "eval_loss": 1.5, "param_notes": ["a"]}
    result = FinetuneResult.from_outputs(reported)
    assert (result.mlflow_run_id, result.final_model_dir, result.training_key) == ("r1", "/m", "k")
    assert json.loads(json.dumps(result.to_outputs(), sort_keys=True)) == reported  # run_record.json unchanged


def test_this_runs_result_comes_before_the_from_run_records(tmp_path):
    earlier = {"run_dir": "/earlier", "steps": {
        "model": {"status": "ok", "outputs": {"model_dir": "/old", "facts": {"name": "m"}}},
        "data": {"status": "ok", "outputs": {"train_file": "/t.jsonl", "manifest_sha256": "abc"}},
        "compute": {"status": "failed", "outputs": {"device": "cuda"}}}}
    record = _record(tmp_path, earlier)
    record.start("model")
    record.finish("model", {"model_dir": "/new"})
    assert ModelResult.recorded(record).model_dir == "/new"
    assert ModelResult.recorded(record).facts is None  # this run's result, whole: not mixed with from_run's
    assert DataResult.recorded(record).manifest_sha256 == "abc"  # from_run's, as record.output finds it
    assert ComputeResult.recorded(record).device is None  # a failed step is no result
    assert ComputeResult.recorded(record).estimate_gb == {}


def test_a_missing_earlier_step_is_one_clear_error(tmp_path):
    record = _record(tmp_path)
    with pytest.raises(MissingInput, match=r"nothing to register: run the finetune step first .*from_run="):
        FinetuneResult.require(record, "nothing to register", needs="final_model_dir")
    record.start("finetune")
    record.finish("finetune", {"job_name": "j1"})  # ran, but made no model folder: still missing
    with pytest.raises(MissingInput, match="run the finetune step first"):
        FinetuneResult.require(record, "nothing to register", needs="final_model_dir")
    assert FinetuneResult.require(record, "no job", needs="job_name").job_name == "j1"
    with pytest.raises(MissingInput, match="no registered model to deploy: run the register step first"):
        RegisterResult.require(record, "no registered model to deploy", needs="model_id")


def test_a_missing_earlier_step_exits_2_on_the_local_backend_too(tmp_path):
    """`steps=[metrics]` with nothing fine-tuned: MissingInput (ftrun prints it and exits 2), no traceback."""
    from runner.workflow import run
    from tests.conftest import compose_cfg

    with pytest.raises(MissingInput, match="no MLflow run to report: run the finetune step first"):
        run(compose_cfg(["steps=[metrics]"]), run_dir=tmp_path / "run")
