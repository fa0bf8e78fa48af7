"""The Azure backend driven by the real workflow (runner.workflow.run): step order, the run record, from_run, the
explicit-override set taken from the task overrides, and the endpoint released when a later step fails."""

import json

import pytest

from runner.azureml.backend import AzureMLBackend
from runner.record import RECORD_FILE, load_record
from runner.schema import ConfigError
from runner.workflow import run
from tests.azureml.double import AzureWorld, rest_body
from tests.conftest import compose_cfg
from tests.azureml.test_backend import DISPLAY_NAME, TIMESTAMP, WS_IDS, write_data

NO_DATA_STEPS = "steps=[connect,model,compute,finetune,metrics,register,deploy,cleanup]"


def earlier_run_with_data(tmp_path):
    """A run dir whose record holds a finished data step, as `ftrun steps=[data]` leaves it."""
    run_dir = tmp_path / "data_run"
    run_dir.mkdir()
    data = write_data(tmp_path)
    record = {"run_dir": str(run_dir), "backend": "azureml", "status": "ok",
              "steps": {"data": {"status": "ok", "outputs": data}}}
    (run_dir / RECORD_FILE).write_text(json.dumps(record))
    return run_dir, data


def finished_job_in_a_file_store(tmp_path, monkeypatch):
    """(tracking uri, run id): an MLflow run with a loss and an eval_loss, standing in for the pipeline job's."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=uri)
    parent = client.create_run(client.create_experiment("e"))
    client.log_batch(parent.info.run_id, metrics=[Metric("loss", 1.0, 0, 1), Metric("eval_loss", 0.9, 0, 1)])
    return uri, parent.info.run_id


def compose(tmp_path, *overrides):
    overrides = ["experiment=phi3_ultrachat", "model.allow_archived=true",
                 f"backend.config_path={tmp_path / 'none.json'}", *WS_IDS, *overrides]
    return compose_cfg(overrides), overrides


def test_workflow_runs_the_azure_steps_in_order_and_records_them(tmp_path, monkeypatch):
    uri, job_name = finished_job_in_a_file_store(tmp_path, monkeypatch)
    data_run, data = earlier_run_with_data(tmp_path)
    world = AzureWorld(job_name=job_name, tracking_uri=uri)
    cfg, overrides = compose(tmp_path, NO_DATA_STEPS, f"from_run={data_run}", "finetune.num_train_epochs=2")
    backend = AzureMLBackend(cfg, clients=world.clients(), clock=lambda: TIMESTAMP)
    record = run(cfg, run_dir=tmp_path / "run", task_overrides=overrides, backend=backend)

    saved = load_record(tmp_path / "run")
    assert saved["status"] == "ok" and saved["backend"] == "azureml"
    assert list(saved["steps"]) == ["connect", "model", "compute", "finetune", "metrics", "register", "deploy",
                                    "cleanup"]
    job = world.find("workspace.jobs.create_or_update")[0].args[0]
    inputs = job._to_dict()["jobs"]["chat_completion_pipeline"]["inputs"]
    assert inputs["num_train_epochs"] == 2  # explicit on the command line: wins over the model's default 1
    assert inputs["train_file_path"]["path"].endswith(data["train_file"])  # picked up from the earlier run
    assert job.display_name == DISPLAY_NAME
    assert record.output("deploy", "endpoint_name") == f"ultrachat-completion-{TIMESTAMP}"
    assert record.output("metrics", "final")["eval_loss"] == pytest.approx(0.9)
    assert world.names()[-2:] == ["workspace.online_endpoints.begin_delete",
                                  "workspace.online_endpoints.begin_delete.result"]


def test_a_later_step_can_pick_up_the_job_from_an_earlier_run(tmp_path):
    """`steps=[register] from_run=<run that submitted>`: connects on demand and registers the recorded job."""
    earlier = tmp_path / "submitted"
    earlier.mkdir()
    (earlier / RECORD_FILE).write_text(json.dumps({"run_dir": str(earlier), "status": "ok", "steps": {
        "finetune": {"status": "ok", "outputs": {"job_name": "quiet_river_7", "status": "submitted"}}}}))
    world = AzureWorld()
    cfg, overrides = compose(tmp_path, "steps=[register]", f"from_run={earlier}")
    record = run(cfg, run_dir=tmp_path / "run", task_overrides=overrides,
                 backend=AzureMLBackend(cfg, clients=world.clients(), clock=lambda: TIMESTAMP))
    assert world.find("workspace.jobs.get")[0].args == ("quiet_river_7",)  # still running? asked first
    model = world.find("workspace.models.create_or_update")[0].args[0]
    assert model.path == "azureml://jobs/quiet_river_7/outputs/trained_model"
    assert record.output("register", "version") == str(TIMESTAMP)


def test_refusal_is_recorded_and_nothing_is_spent(tmp_path):
    world = AzureWorld()
    cfg, overrides = compose(tmp_path, "compute=nd40rs_v2", "model.allow_archived=true")
    with pytest.raises(ConfigError, match="not in Phi-3-mini-4k-instruct's fine-tune compute allow list"):
        run(cfg, run_dir=tmp_path / "run", task_overrides=overrides,
            backend=AzureMLBackend(cfg, clients=world.clients()))
    saved = load_record(tmp_path / "run")
    assert saved["status"] == "failed" and saved["error"]["step"] == "model"
    assert world.spending() == []


def test_full_workflow_with_the_shared_data_and_test_steps(tmp_path):
    """The whole notebook through the workflow, including the shared data step (dataset=sample, made offline) and
    the sample request; a reply the runner cannot read fails the test step, and the endpoint is still deleted."""
    pytest.importorskip("runner.data.step")
    pytest.importorskip("runner.data.sample_request")
    world = AzureWorld()
    world.response = '{"error": "model not loaded"}'
    cfg, overrides = compose(tmp_path, "dataset=sample", "steps=[connect,model,compute,data,finetune,register,"
                                                          "deploy,test,cleanup]")
    with pytest.raises(Exception, match="no 'output' or '0' key"):
        run(cfg, run_dir=tmp_path / "run", task_overrides=overrides,
            backend=AzureMLBackend(cfg, clients=world.clients(), clock=lambda: TIMESTAMP))
    invoke = world.find("workspace.online_endpoints.invoke")[0]
    request = json.loads(open(invoke.kwargs["request_file"]).read())
    assert request["input_data"]["input_string"]
    assert world.names()[-2:] == ["workspace.online_endpoints.begin_delete",
                                  "workspace.online_endpoints.begin_delete.result"]
    saved = load_record(tmp_path / "run")
    assert saved["steps"]["test"]["status"] == "failed" and saved["steps"]["cleanup"]["status"] == "ok"


def test_failed_pipeline_job_ends_the_run_at_finetune(tmp_path):
    """jobs.stream raises the SDK's JobException for a Failed job: the run stops at finetune with the job's name and
    studio page, the record says so, and no later step runs (nothing registered, nothing deployed)."""
    data_run, _ = earlier_run_with_data(tmp_path)
    world = AzureWorld()
    world.job_status = "Failed"
    cfg, overrides = compose(tmp_path, NO_DATA_STEPS, f"from_run={data_run}")
    with pytest.raises(Exception, match="pipeline job sincere_kettle_42 did not complete") as info:
        run(cfg, run_dir=tmp_path / "run", task_overrides=overrides,
            backend=AzureMLBackend(cfg, clients=world.clients(), clock=lambda: TIMESTAMP))
    assert "https://ml.azure.com/runs/sincere_kettle_42" in str(info.value)
    saved = load_record(tmp_path / "run")
    assert saved["status"] == "failed" and saved["error"]["step"] == "finetune"
    assert "https://ml.azure.com/runs/sincere_kettle_42" in json.dumps(saved["error"])
    assert [s for s in saved["steps"] if saved["steps"][s]["status"] == "ok"] == ["connect", "model", "compute"]
    assert not {"metrics", "register", "deploy"} & {s for s in saved["steps"] if saved["steps"][s]["status"] == "ok"}
    assert world.names()[-1] == "workspace.jobs.stream"
    assert world.spending() == ["workspace.begin_create_or_update", "workspace.jobs.create_or_update"]


def test_phi4_as_the_registry_serves_it_is_refused_at_the_model_step(tmp_path, capsys):
    """Finding 1 through the workflow: Phi-4's lists live only in system metadata, which azure-ai-ml drops;
    `compute=nd40rs_v2 deployment.instance_type=Standard_D2as_v4` is refused at the model step from the preset's
    lists (said in the output), before any compute call."""
    world = AzureWorld()
    world.model_body = rest_body("Phi-4")
    overrides = ["experiment=phi4_ultrachat", f"backend.config_path={tmp_path / 'none.json'}", *WS_IDS,
                 "compute=nd40rs_v2", "deployment.instance_type=Standard_D2as_v4"]
    cfg = compose_cfg(overrides)
    with pytest.raises(ConfigError, match="compute.size=Standard_ND40rs_v2 is not in Phi-4's fine-tune"):
        run(cfg, run_dir=tmp_path / "run", task_overrides=overrides,
            backend=AzureMLBackend(cfg, clients=world.clients()))
    saved = load_record(tmp_path / "run")
    assert saved["status"] == "failed" and saved["error"]["step"] == "model"
    assert world.names()[-1] == "registry.models.get" and world.spending() == []
    source = "registry REST body system metadata (SKU.finetuneRecommendedSkus)"
    assert f"fine-tune from {source}" in capsys.readouterr().out
    # the refusal's grounds are in the record, not only in the log
    assert saved["steps"]["model"]["refusal"] == {
        "check": "fine-tune compute allow list", "size": "Standard_ND40rs_v2", "allow_list_source": source,
        "allow_list": rest_body("Phi-4")["properties"]["systemMetadata"]["SKU"]["finetuneRecommendedSkus"]}
