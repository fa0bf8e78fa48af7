"""A record's registered version must still be the model it registered: deploy refuses another run's model (naming
both runs) and a version whose files are gone, before any endpoint process starts (runner/local/model_identity.py)."""

from pathlib import Path

import pytest

from runner.local import model_identity
from runner.local.backend import LocalBackend
from runner.local.model_identity import ModelFilesMissing, ModelIdentityMismatch, verify_registered_model
from runner.record import RunRecord
from runner.steps.context import StepContext
from tests.conftest import compose_cfg


def _run_with_model(client, exp_id: str, payload: str) -> tuple:
    """An MLflow run whose `model` artifact folder holds a minimal model (MLmodel + one weights file)."""
    from runner.local.registry import local_artifact_dir

    run = client.create_run(exp_id)
    folder = local_artifact_dir(run.info.artifact_uri) / "model"
    folder.mkdir(parents=True)
    (folder / "MLmodel").write_text("flavors: {}\n")
    (folder / "model.safetensors").write_text(payload)
    return run.info.run_id, folder


@pytest.fixture
def setup(tmp_path):
    cfg = compose_cfg()
    backend = LocalBackend(cfg)
    from runner.local.tracking import ensure_experiment, mlflow_client

    client = mlflow_client(cfg.mlflow.tracking_uri)
    exp_id = ensure_experiment(client, "identity", str(Path(cfg.mlflow.artifact_location)))
    return cfg, backend, client, exp_id, tmp_path


def _ctx(cfg, run_dir: Path, register_outputs: dict) -> StepContext:
    earlier = {"run_dir": "earlier", "steps": {"register": {"status": "ok", "outputs": register_outputs}}}
    record = RunRecord(run_dir, backend="local", config_sha256="x", earlier=earlier)
    return StepContext(cfg=cfg, run_dir=run_dir, record=record)


def _no_server(monkeypatch):
    import runner.local.endpoint.manager as manager

    def start_endpoint(**kwargs):
        raise AssertionError("an endpoint process was started")

    monkeypatch.setattr(manager, "start_endpoint", start_endpoint)


def test_a_version_now_belonging_to_another_run_is_refused_at_deploy(setup, monkeypatch):
    cfg, backend, client, exp_id, tmp_path = setup
    run_a, folder_a = _run_with_model(client, exp_id, "weights of run A")
    recorded = {"model_uri": "models:/m/1", "run_id": run_a, "model_sha256": model_identity.content_sha256(folder_a)}
    # the store was replaced: run B registered its model, and got version 1 again
    run_b, folder_b = _run_with_model(client, exp_id, "weights of run B")
    client.create_registered_model("m")
    client.create_model_version("m", source=folder_b.as_uri(), run_id=run_b)
    _no_server(monkeypatch)
    with pytest.raises(ModelIdentityMismatch) as err:
        backend.deploy(_ctx(cfg, tmp_path / "run", recorded))
    assert run_a in str(err.value) and run_b in str(err.value)


def test_changed_files_of_the_same_run_are_refused(setup):
    cfg, backend, client, exp_id, tmp_path = setup
    run_a, folder_a = _run_with_model(client, exp_id, "weights")
    client.create_registered_model("m")
    client.create_model_version("m", source=folder_a.as_uri(), run_id=run_a)
    recorded = {"model_uri": "models:/m/1", "run_id": run_a, **model_identity.identity(cfg.mlflow.tracking_uri,
                                                                                     "models:/m/1")}
    assert verify_registered_model(cfg.mlflow.tracking_uri, recorded)["registered_run_id"] == run_a
    (folder_a / "model.safetensors").write_text("other weights")
    with pytest.raises(ModelIdentityMismatch, match="changed since"):
        verify_registered_model(cfg.mlflow.tracking_uri, recorded)


def test_a_deleted_model_folder_is_refused_before_any_server_starts(setup, monkeypatch):
    import shutil

    cfg, backend, client, exp_id, tmp_path = setup
    run_a, folder_a = _run_with_model(client, exp_id, "weights")
    client.create_registered_model("m")
    client.create_model_version("m", source=folder_a.as_uri(), run_id=run_a)
    recorded = {"model_uri": "models:/m/1", "run_id": run_a}
    shutil.rmtree(folder_a)
    _no_server(monkeypatch)
    with pytest.raises(ModelFilesMissing, match=str(folder_a)):
        backend.deploy(_ctx(cfg, tmp_path / "run", recorded))
