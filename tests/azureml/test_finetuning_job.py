"""finetune.route=finetuning_job and deployment.kind=serverless: the `type: finetuning` job, the model it registers,
the ServerlessEndpoint, its /v1/chat/completions call and its deletion; the dry run's files, loaded back by the SDK."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import yaml

from runner.azureml.backend import AzureMLBackend
from runner.schema import ConfigError, validate
from runner.workflow import run
from tests.azureml.double import AzureWorld, rest_body
from tests.conftest import compose_cfg

CLOCK = 1795600000.0
WS = ["backend.subscription_id=sub-0000", "backend.resource_group=rg-demo", "backend.workspace_name=ws-demo"]
STEPS = "steps=[connect,model,compute,data,finetune,register,deploy,test,cleanup]"


def quiet_load(loader, path):
    import logging

    logging.disable(logging.WARNING)  # the SDK's "experimental class" notices
    try:
        return loader(source=str(path))
    finally:
        logging.disable(logging.NOTSET)


def real_run(tmp_path, overrides, world=None, model="Phi-4-mini-instruct"):
    overrides = [*overrides, "dataset=sample", f"backend.config_path={tmp_path / 'none.json'}", *WS]
    cfg = compose_cfg(overrides)
    world = world or AzureWorld()
    world.model_body = rest_body(model)
    run(cfg, run_dir=tmp_path / "run", task_overrides=overrides,
        backend=AzureMLBackend(cfg, clients=world.clients(), clock=lambda: CLOCK))
    return world, json.loads((tmp_path / "run" / "run_record.json").read_text())


def submitted_job(world):
    call = world.find("workspace.jobs.create_or_update")[-1]
    return call.args[0] if call.args else call.kwargs["job"]


# ---- the SDK's facts the route is built on -----------------------------------------------------------------------


def test_create_finetuning_job_without_validation_data_is_worked_around(tmp_path):
    from azure.ai.ml import load_job
    from azure.ai.ml.finetuning import create_finetuning_job

    from runner.azureml.finetuning_job import build_finetuning_job, finetuning_job_yaml

    args = dict(model="azureml://registries/azureml/models/Phi-4-mini-instruct/versions/1",
                training_data=str(tmp_path / "train.jsonl"), output_model_name_prefix="ft-model",
                hyperparameters={"learning_rate": "0.00002"})
    with pytest.raises(UnboundLocalError):  # azure-ai-ml 1.35.2's bug: the reason for the workaround
        create_finetuning_job(task="chat_completion", **args)
    job = build_finetuning_job(model=args["model"], training_data=args["training_data"], validation_data=None,
                               hyperparameters=args["hyperparameters"], output_model_name="ft-model",
                               display_name="d", experiment_name="e")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(finetuning_job_yaml(job), sort_keys=False))
    loaded = quiet_load(load_job, path)
    assert loaded.validation_data is None and loaded.training_data.path == args["training_data"]
    assert loaded.outputs["registered_model"].name == "ft-model"
    # the same entity create_finetuning_job builds when it does not fail
    with_validation = build_finetuning_job(model=args["model"], training_data=args["training_data"],
                                           validation_data=str(tmp_path / "v.jsonl"),
                                           hyperparameters=args["hyperparameters"], output_model_name="ft-model",
                                           display_name="d", experiment_name="e")
    assert type(with_validation) is type(job) and with_validation.task == job.task == "chatCompletion"  # from FineTuningTaskType.CHAT_COMPLETION


def test_hyperparameters_are_the_documented_keys_as_strings_the_job_schema_takes(tmp_path):
    from azure.ai.ml import load_job

    from runner.azureml.routes import as_string, hyperparameters

    cfg = compose_cfg(["experiment=phi4_mini_serverless", "finetune.learning_rate=3e-5", "finetune.lora_r=16"])
    from runner.finetune_params import merge_finetune_params

    params, _ = merge_finetune_params(cfg.finetune, {}, ())
    sent, notes = hyperparameters(params, ["learning_rate"])
    assert sent == {"num_train_epochs": "1", "per_device_train_batch_size": "1", "learning_rate": "0.00003"}
    assert any("finetune.lora_r=16 not sent" in n for n in notes)
    assert as_string(2e-5) == "0.00002" and as_string(True) == "true" and as_string(3) == "3"
    # what the SDK's schema says about a number (the reason every value is a string)
    plan = tmp_path / "plan"
    run(compose_cfg(["experiment=phi4_mini_serverless", "dry_run=true"]), run_dir=tmp_path,
        task_overrides=["experiment=phi4_mini_serverless", "dry_run=true"])
    data = yaml.safe_load((plan / "finetuning_job.yaml").read_text())
    data["hyperparameters"]["learning_rate"] = 2e-5
    (tmp_path / "numeric.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(Exception, match="Not a valid string"):
        quiet_load(load_job, tmp_path / "numeric.yaml")


def test_a_finetune_key_the_job_does_not_take_is_refused_before_anything_is_spent(tmp_path):
    with pytest.raises(ConfigError, match=r"finetune.lora_r would not be sent.*finetune.route=pipeline"):
        world, _ = real_run(tmp_path, ["experiment=phi4_mini_serverless", "finetune.lora_r=16"])
    # with the pipeline route the same key is a component input
    validate(compose_cfg(["experiment=phi4_ultrachat", "finetune.lora_r=16"]))


# ---- which model goes where -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["phi3_mini_4k_instruct", "phi35_mini_instruct"])
def test_a_phi3_model_serverless_is_refused_before_anything_is_spent(tmp_path, model):
    overrides = ["experiment=phi4_mini_serverless", f"model={model}", "model.allow_archived=true"]
    with pytest.raises(ConfigError) as err:
        validate(compose_cfg(overrides))
    message = str(err.value)
    assert "cannot be fine-tuned serverless" in message
    assert "Phi-4, Phi-4-mini-instruct, Phi-4-multimodal-instruct" in message and "managed compute" in message
    world = AzureWorld()
    with pytest.raises(ConfigError, match="cannot be fine-tuned serverless"):
        real_run(tmp_path, overrides, world=world, model="Phi-3-mini-4k-instruct")
    assert world.calls == []  # no login, nothing sent


@pytest.mark.parametrize("overrides, words", [
    (["experiment=phi4_ultrachat", "compute=serverless"], "compute=serverless needs finetune.route=finetuning_job"),
    (["experiment=phi4_ultrachat", "deployment=serverless"],
     "deployment=serverless serves models fine-tuned serverless"),
    (["experiment=phi4_ultrachat", "finetune.route=finetuning_job", "deployment=serverless"],
     "deployment=serverless serves models fine-tuned serverless"),
    (["finetune.route=finetuning_job"], "is an Azure ML route"),
], ids=["pipeline-serverless-compute", "pipeline-serverless-endpoint", "cluster-serverless-endpoint", "local"])
def test_combinations_azure_does_not_offer_are_refused(overrides, words):
    with pytest.raises(ConfigError, match=words):
        validate(compose_cfg(overrides))


def test_deployment_kind_azure_still_means_a_managed_online_endpoint():
    cfg = compose_cfg(["experiment=phi4_ultrachat", "deployment.kind=azure"])
    validate(cfg)
    assert compose_cfg(["experiment=phi4_ultrachat"]).deployment.kind == "managed_online"
    with pytest.raises(ConfigError, match="deployment.kind=serverless"):
        validate(compose_cfg(["deployment=serverless"]))  # the local backend: a local endpoint preset


# ---- the dry run --------------------------------------------------------------------------------------------------


def test_the_serverless_dry_run_writes_files_the_sdk_loads_back(tmp_path):
    from azure.ai.ml import load_job, load_serverless_endpoint

    overrides = ["experiment=phi4_mini_serverless", "dry_run=true"]
    run(compose_cfg(overrides), run_dir=tmp_path / "run", task_overrides=overrides)
    plan = tmp_path / "run" / "plan"
    assert sorted(p.name for p in plan.iterdir()) == [
        "chat_request.json", "evaluate_base_endpoint.rest.json", "evaluate_base_endpoint.yaml",
        "evaluate_ft_endpoint.rest.json", "evaluate_ft_endpoint.yaml", "export.yaml", "finetuning_job.rest.json",
        "finetuning_job.yaml", "plan.yaml", "serverless_endpoint.rest.json", "serverless_endpoint.yaml"]
    job = quiet_load(load_job, plan / "finetuning_job.yaml")
    assert type(job).__name__ == "CustomModelFineTuningJob" and job.type == "finetuning"
    assert job.task == "chatCompletion" and str(job.model_provider).endswith("CUSTOM")
    assert job.model.path == "azureml://registries/azureml/models/Phi-4-mini-instruct/versions/3"
    assert job.training_data.path.endswith("ultrachat_200k/train_sft.jsonl")
    assert job.validation_data.path.endswith("ultrachat_200k/test_sft.jsonl")
    assert job.hyperparameters == {"num_train_epochs": "1", "per_device_train_batch_size": "1",
                                   "learning_rate": "0.00002"}
    assert job.compute is None and job.resources is None  # serverless
    # the run's own model name: mlflow.registered_model_name + the run's timestamp (never shared between runs)
    assert re.fullmatch(r"Phi-4-mini-instruct-ultrachat-200k-\d{10}", job.outputs["registered_model"].name)
    endpoint = quiet_load(load_serverless_endpoint, plan / "serverless_endpoint.yaml")
    assert endpoint.model_id.endswith(f"/models/{job.outputs['registered_model'].name}/versions/1")
    assert endpoint.model_id.startswith("azureml://locations/") and endpoint.auth_mode == "key"
    # the evaluate step's two endpoints: the base by its registry id (no version: the SDK refuses one), the
    # fine-tuned model as the deploy step serves it
    base = quiet_load(load_serverless_endpoint, plan / "evaluate_base_endpoint.yaml")
    assert base.model_id == "azureml://registries/azureml/models/Phi-4-mini-instruct"
    assert quiet_load(load_serverless_endpoint, plan / "evaluate_ft_endpoint.yaml").model_id == endpoint.model_id
    request = json.loads((plan / "chat_request.json").read_text())
    assert request["messages"][0]["role"] == "user" and request["max_tokens"] == 200
    summary = yaml.safe_load((plan / "plan.yaml").read_text())
    calls = [c["call"] for c in summary["calls"]]
    assert calls[:2] == ["registry.models.get", "workspace.jobs.create_or_update"]
    assert "workspace.serverless_endpoints.begin_create_or_update" in calls
    assert calls[-2].startswith("POST https://") and calls[-2].endswith("/v1/chat/completions")
    assert calls[-1] == "workspace.serverless_endpoints.begin_delete"
    assert not any("compute" in c or "components" in c for c in calls)  # no cluster, no pipeline component
    assert summary["finetune"]["route"] == "finetuning_job" and summary["finetune"]["runs_on"] == "serverless"


# ---- a run against the double -------------------------------------------------------------------------------------


class _ChatServer:
    """A stand-in for the serverless endpoint's HTTP API on 127.0.0.1: records each request, answers in the
    chat-completions shape; 401 without the key."""

    def __init__(self, key):
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, dict(self.headers), body))
                ok = self.headers.get("Authorization") == f"Bearer {key}"
                reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."}}]}
                data = json.dumps(reply if ok else {"error": "unauthorized"}).encode()
                self.send_response(200 if ok else 401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.uri = f"http://127.0.0.1:{self.server.server_port}"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def chat_server():
    server = _ChatServer(AzureWorld().serverless_keys[0])
    yield server
    server.stop()


def test_the_serverless_experiment_runs_against_the_double(tmp_path, chat_server):
    world = AzureWorld()
    world.serverless_scoring_uri = chat_server.uri
    world, record = real_run(tmp_path, ["experiment=phi4_mini_serverless", STEPS], world=world)
    assert world.spending() == ["workspace.jobs.create_or_update",
                                "workspace.serverless_endpoints.begin_create_or_update",
                                "workspace.serverless_endpoints.begin_delete"]
    job = submitted_job(world)
    assert job.compute is None and job.resources is None and job.queue_settings is None  # serverless
    assert job.validation_data is not None and all(isinstance(v, str) for v in job.hyperparameters.values())
    steps = record["steps"]
    assert steps["finetune"]["outputs"]["job_name"] == world.job_name
    assert steps["finetune"]["outputs"]["status"] == "Completed"
    registered = steps["register"]["outputs"]
    assert (registered["name"], registered["version"]) == (f"Phi-4-mini-instruct-sample-{int(CLOCK)}", "1")
    assert "workspace.models.create_or_update" not in world.names()  # the job's output registered it
    endpoint = world.find("workspace.serverless_endpoints.begin_create_or_update")[0].args[0]
    assert endpoint.model_id == (f"azureml://locations/eastus2/workspaces/{world.workspace_id}/models/"
                                 f"Phi-4-mini-instruct-sample-{int(CLOCK)}/versions/1")
    # the endpoint was called once, at its chat-completions path, with its key, in the OpenAI shape
    [(path, headers, body)] = chat_server.requests
    assert path == "/v1/chat/completions" and headers["Authorization"] == f"Bearer {world.serverless_keys[0]}"
    assert body["messages"][-1]["role"] == "user" and body["max_tokens"] == 200 and "do_sample" not in body
    assert steps["test"]["outputs"]["reply"] == "Paris."
    assert steps["cleanup"]["outputs"]["deleted"] == steps["deploy"]["outputs"]["endpoint_name"]
    # every long-running operation was waited for to its end: the endpoint had its scoring URI when deploy
    # returned, and the delete has ended (the double's pollers say InProgress until waited for)
    assert world.unfinished() == []
    assert steps["deploy"]["outputs"]["scoring_uri"] == chat_server.uri
    assert world.serverless_endpoints == {}
    written = [p.read_text(errors="replace") for p in (tmp_path / "run").rglob("*") if p.is_file()
               and p.suffix in (".json", ".log", ".yaml")]
    assert written and not any(world.serverless_keys[0] in text for text in written)  # the key is never recorded


def test_a_failed_finetuning_job_stops_before_anything_is_registered_or_deployed(tmp_path):
    from runner.errors import RunnerError

    world = AzureWorld()
    world.job_status = "Failed"
    with pytest.raises(RunnerError, match="finetuning job .* is Failed"):
        real_run(tmp_path, ["experiment=phi4_mini_serverless", STEPS], world=world)
    assert world.spending() == ["workspace.jobs.create_or_update"]


def test_a_registry_version_as_the_serverless_model_is_refused_as_the_sdk_does():
    from azure.ai.ml.entities import ServerlessEndpoint
    from azure.ai.ml.exceptions import ValidationException

    world = AzureWorld()
    client = world.clients().workspace(None, compose_cfg(["backend=azureml", *WS]).backend)
    with pytest.raises(ValidationException, match="specific model version"):
        client.serverless_endpoints.begin_create_or_update(ServerlessEndpoint(
            name="ep", model_id="azureml://registries/azureml/models/Phi-4-mini-instruct/versions/1"))
    with pytest.raises(TypeError):  # autospecced from ServerlessEndpointOperations: a wrong keyword fails
        client.serverless_endpoints.get_keys(endpoint_name="ep")


# ---- managed compute: a cluster, or instance types ---------------------------------------------------------------


def test_the_job_on_a_cluster_deploys_to_a_managed_online_endpoint(tmp_path):
    world = AzureWorld()
    overrides = ["backend=azureml", "model=phi4", "compute=nc24ads_a100_v4", "deployment=azure",
                 "deployment.instance_type=Standard_NC24ads_A100_v4", "finetune.route=finetuning_job",
                 "compute.job_tier=standard", "model.version=8", STEPS]
    from azure.ai.ml.entities import VmSize

    world.sizes = [VmSize(name="Standard_NC24ads_A100_v4", gpus=1)]
    world, record = real_run(tmp_path, overrides, world=world, model="Phi-4")
    job = submitted_job(world)
    assert job.compute == "gpu-cluster-big" and job.queue_settings.job_tier == "standard"
    assert "workspace.begin_create_or_update" in world.names()  # the cluster, then the endpoint
    deployment = world.find("workspace.online_deployments.begin_create_or_update")[0].args[0]
    assert deployment.model.endswith(f"/models/Phi-4-sample-{int(CLOCK)}/versions/1")  # the model the job registered
    assert world.find("workspace.online_endpoints.invoke") and world.find("workspace.online_endpoints.begin_delete")


def test_the_job_on_instance_types_creates_no_cluster(tmp_path):
    world = AzureWorld()
    overrides = ["backend=azureml", "model=phi4", "compute=nc24ads_a100_v4", "deployment=azure",
                 "deployment.instance_type=Standard_NC24ads_A100_v4", "finetune.route=finetuning_job",
                 "compute.instance_types=[Standard_NC24ads_A100_v4,Standard_NC48ads_A100_v4]", "model.version=8",
                 "steps=[connect,model,compute,data,finetune]"]
    world, _ = real_run(tmp_path, overrides, world=world, model="Phi-4")
    job = submitted_job(world)
    assert job.compute is None
    assert job.resources.instance_types == ["Standard_NC24ads_A100_v4", "Standard_NC48ads_A100_v4"]
    assert not [n for n in world.names() if "compute" in n]
    with pytest.raises(ConfigError, match="compute.instance_types=Standard_ND40rs_v2 is not in Phi-4"):
        real_run(tmp_path / "b", overrides[:-2] + ["compute.instance_types=[Standard_ND40rs_v2]", "model.version=8",
                                                   "steps=[connect,model,compute,data,finetune]"], model="Phi-4")


def test_a_serverless_job_without_metrics_in_the_workspace_goes_on_to_register(tmp_path, monkeypatch, capsys):
    """A serverless job trains on Azure's capacity: its curves may not be in the workspace's MLflow, and that must
    not stop the run before its model is registered and served (a cluster job without metrics still stops)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=uri)
    job_run = client.create_run(client.create_experiment("e"))  # the job's run, no metrics logged
    world = AzureWorld(job_name=job_run.info.run_id, tracking_uri=uri)
    steps = "steps=[connect,model,compute,data,finetune,metrics,register,deploy,test,cleanup]"
    world, record = real_run(tmp_path, ["experiment=phi4_mini_serverless", steps], world=world)
    assert "logged no metrics to this workspace's MLflow" in capsys.readouterr().out
    assert record["steps"]["register"]["status"] == "ok" and record["steps"]["cleanup"]["status"] == "ok"
