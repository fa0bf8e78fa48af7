"""A pipeline job is never lost: its name is in the run record the moment it is submitted, and a later run
continues from it (finetune.attach_job=NAME, or from_run of the run whose stream broke) without submitting again."""

import json

import pytest

from runner.azureml.backend import AzureMLBackend
from runner.azureml.checks import AzureStepError
from runner.record import RECORD_FILE
from runner.workflow import run
from tests.azureml.double import AzureWorld, Call
from tests.conftest import compose_cfg
from tests.azureml.test_backend import TIMESTAMP, WS_IDS

FIRST = "steps=[connect,model,compute,data,finetune,register,deploy,test,cleanup]"


def _run(tmp_path, world, name, *extra):
    overrides = ["experiment=phi4_ultrachat", "dataset=sample", f"backend.config_path={tmp_path / 'none.json'}",
                 *WS_IDS, *extra]
    cfg = compose_cfg(overrides)
    return run(cfg, run_dir=tmp_path / name, task_overrides=overrides,
               backend=AzureMLBackend(cfg, clients=world.clients(), clock=lambda: TIMESTAMP))


def _world():
    world = AzureWorld(job_name="brave_lamp_11")
    world.model_body = world.registry_bodies["Phi-4"]
    world.job_status = "Running"
    return world


def _saved(tmp_path, name):
    return json.loads((tmp_path / name / RECORD_FILE).read_text())


def test_a_dropped_stream_leaves_the_job_name_and_from_run_continues_without_resubmitting(tmp_path):
    from azure.core.exceptions import ServiceResponseError

    world = _world()
    world.stream_errors = [ServiceResponseError("Connection aborted: RemoteDisconnected")]
    with pytest.raises(AzureStepError, match="lost the stream of pipeline job brave_lamp_11.*may still be running"
                                             ".*finetune.attach_job=brave_lamp_11"):
        _run(tmp_path, world, "first", FIRST)
    first = _saved(tmp_path, "first")
    assert first["steps"]["finetune"]["status"] == "failed"
    assert first["steps"]["finetune"]["job_name"] == "brave_lamp_11"  # saved at submission, kept by the failure
    assert first["steps"]["finetune"]["submitted"]["display_name"]
    assert world.spending().count("workspace.jobs.create_or_update") == 1

    record = _run(tmp_path, world, "second", "steps=[finetune,register,deploy,test,cleanup]",
                  f"from_run={tmp_path / 'first'}")
    assert world.spending().count("workspace.jobs.create_or_update") == 1  # no second submission
    assert record.output("finetune", "status") == "Completed"
    assert record.output("finetune", "attached") == f"from_run={tmp_path / 'first'}"
    assert record.output("finetune", "display_name") == first["steps"]["finetune"]["submitted"]["display_name"]
    model = world.find("workspace.models.create_or_update")[0].args[0]
    assert model.path == "azureml://jobs/brave_lamp_11/outputs/trained_model"
    assert record.data["status"] == "ok"


def test_ctrl_c_during_the_stream_and_attach_job_continues_in_a_fresh_run(tmp_path, capsys):
    world = _world()
    world.stream_errors = [KeyboardInterrupt()]
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, world, "first", FIRST)
    assert _saved(tmp_path, "first")["steps"]["finetune"]["job_name"] == "brave_lamp_11"
    assert "goes on running in Azure" in capsys.readouterr().out

    # a fresh run (no from_run, no data step): attaches, waits, registers
    record = _run(tmp_path, world, "second", "steps=[connect,finetune,register]",
                  "finetune.attach_job=brave_lamp_11")
    assert world.spending().count("workspace.jobs.create_or_update") == 1
    assert world.find("workspace.jobs.stream")[-1].args == ("brave_lamp_11",)
    assert record.output("finetune", "job_name") == "brave_lamp_11"
    assert record.output("register", "source") == "azureml://jobs/brave_lamp_11/outputs/trained_model"


def test_attach_job_to_a_failed_job_is_refused_and_from_run_of_a_failed_job_submits_anew(tmp_path):
    from azure.core.exceptions import ServiceResponseError

    world = _world()
    world.stream_errors = [ServiceResponseError("reset")]
    with pytest.raises(AzureStepError):
        _run(tmp_path, world, "first", FIRST)
    world.job_status = "Failed"
    with pytest.raises(AzureStepError, match="finetune.attach_job=brave_lamp_11: the job is Failed"):
        _run(tmp_path, world, "explicit", "steps=[connect,finetune]", "finetune.attach_job=brave_lamp_11")
    # the first job stays Failed; from_run then submits a new job (which runs and completes)
    world.job_status = "Running"
    world.job_name = "second_try_2"
    world_get = world.answer

    def answer(name, args, kwargs):
        if name == "workspace.jobs.get" and (args[0] if args else kwargs.get("name")) == "brave_lamp_11":
            world.calls.append(Call(("workspace.jobs.get", args, kwargs)))
            from azure.ai.ml.entities import PipelineJob
            return PipelineJob(name="brave_lamp_11", status="Failed")
        return world_get(name, args, kwargs)

    world.answer = answer
    record = _run(tmp_path, world, "again", "steps=[finetune]", f"from_run={tmp_path / 'first'}")
    assert world.spending().count("workspace.jobs.create_or_update") == 2
    assert record.output("finetune", "job_name") == "second_try_2"


def test_attach_job_is_refused_on_the_local_backend(tmp_path):
    from runner.schema import ConfigError

    overrides = ["steps=[finetune]", "finetune.attach_job=brave_lamp_11"]
    cfg = compose_cfg(overrides)
    with pytest.raises(ConfigError, match="only backend=azureml"):
        run(cfg, run_dir=tmp_path / "run", task_overrides=overrides)


def test_attach_job_is_not_a_component_input(tmp_path):
    world = _world()
    _run(tmp_path, world, "plan", "steps=[connect,model,compute,data,finetune]", "finetune.attach_job=null")
    job = world.find("workspace.jobs.create_or_update")[0].args[0]
    assert "attach_job" not in job.jobs["chat_completion_pipeline"].inputs

# ---- finetune.route=finetuning_job: the same guarantees for the `type: finetuning` job ----------------------------


def _serverless_run(tmp_path, world, name, monkeypatch, *extra):
    overrides = ["experiment=phi4_mini_serverless", "dataset=sample", f"backend.config_path={tmp_path / 'none.json'}",
                 *WS_IDS, *extra]
    cfg = compose_cfg(overrides)
    return run(cfg, run_dir=tmp_path / name, task_overrides=overrides,
               backend=AzureMLBackend(cfg, clients=world.clients(), clock=lambda: TIMESTAMP))


def _poll_clock(monkeypatch, on_sleep):
    """finetuning_job.wait_for's sleep between polls, replaced (no 30 s waits in a test)."""
    from types import SimpleNamespace

    from runner.azureml import finetuning_job

    monkeypatch.setattr(finetuning_job, "time", SimpleNamespace(sleep=on_sleep))


def test_ctrl_c_while_a_finetuning_job_is_polled_keeps_its_name_and_attach_job_continues(tmp_path, monkeypatch,
                                                                                         capsys):
    from tests.azureml.double import rest_body

    world = AzureWorld(job_name="brave_lamp_11")
    world.model_body = rest_body("Phi-4-mini-instruct")
    world.job_status = "Running"

    def ctrl_c(seconds):
        raise KeyboardInterrupt()

    _poll_clock(monkeypatch, ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _serverless_run(tmp_path, world, "first", monkeypatch, FIRST)
    first = _saved(tmp_path, "first")
    assert first["steps"]["finetune"]["job_name"] == "brave_lamp_11"  # saved at submission
    assert first["steps"]["finetune"]["submitted"]["registered_model_name"]
    out = capsys.readouterr().out
    assert "finetuning job brave_lamp_11 goes on running in Azure" in out
    assert "finetune.attach_job=brave_lamp_11" in out

    def job_ends(seconds):
        world.job_status = "Completed"

    _poll_clock(monkeypatch, job_ends)
    record = _serverless_run(tmp_path, world, "second", monkeypatch, "steps=[connect,finetune,register]",
                             "finetune.attach_job=brave_lamp_11")
    assert world.spending().count("workspace.jobs.create_or_update") == 1  # no second submission
    assert record.output("finetune", "attached") == "finetune.attach_job"
    assert record.output("finetune", "status") == "Completed"
    assert record.output("register", "source") == "azureml://jobs/brave_lamp_11/outputs/registered_model"


def test_from_run_of_a_finetuning_job_whose_polling_broke_continues_without_resubmitting(tmp_path, monkeypatch):
    from azure.core.exceptions import ServiceResponseError

    from tests.azureml.double import rest_body

    world = AzureWorld(job_name="brave_lamp_11")
    world.model_body = rest_body("Phi-4-mini-instruct")
    world.job_status = "Running"

    def network_down(seconds):
        raise ServiceResponseError("Connection aborted: RemoteDisconnected")

    _poll_clock(monkeypatch, network_down)
    with pytest.raises(AzureStepError, match="lost track of finetuning job brave_lamp_11.*may still be running"
                                             ".*finetune.attach_job=brave_lamp_11"):
        _serverless_run(tmp_path, world, "first", monkeypatch, FIRST)
    assert _saved(tmp_path, "first")["steps"]["finetune"]["status"] == "failed"

    world.job_status = "Completed"
    record = _serverless_run(tmp_path, world, "second", monkeypatch, "steps=[finetune,register,deploy,test,cleanup]",
                             f"from_run={tmp_path / 'first'}")
    assert world.spending().count("workspace.jobs.create_or_update") == 1
    assert record.output("finetune", "attached") == f"from_run={tmp_path / 'first'}"
    assert record.data["status"] == "ok"
    assert world.spending()[-1] == "workspace.serverless_endpoints.begin_delete"


def test_attach_job_to_a_failed_finetuning_job_is_refused(tmp_path, monkeypatch):
    from tests.azureml.double import rest_body

    world = AzureWorld(job_name="brave_lamp_11")
    world.model_body = rest_body("Phi-4-mini-instruct")
    world.job_status = "Running"
    _poll_clock(monkeypatch, lambda seconds: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _serverless_run(tmp_path, world, "first", monkeypatch, "steps=[connect,model,compute,data,finetune]")
    world.job_status = "Failed"
    with pytest.raises(AzureStepError, match="finetune.attach_job=brave_lamp_11: the job is Failed"):
        _serverless_run(tmp_path, world, "explicit", monkeypatch, "steps=[connect,finetune]",
                        "finetune.attach_job=brave_lamp_11")
    assert world.spending().count("workspace.jobs.create_or_update") == 1
