"""What goes on the wire, as azure-ai-ml 1.35.2 sends it: REST bodies with the REST model's types, keywords the SDK
really reads, and long-running operations that are still running when they answer."""

import json

import pytest

from runner.azureml.wire import WireTypeError, wire_body
from runner.workflow import run
from tests.azureml.double import AzureWorld
from tests.conftest import compose_cfg


def _serverless_endpoint():
    from azure.ai.ml.entities import ServerlessEndpoint

    return ServerlessEndpoint(name="ep-abc", model_id="azureml://locations/eastus2/workspaces/w/models/m/versions/1",
                              auth_mode="key")


def test_a_string_where_the_rest_model_reads_an_int_is_refused():
    from azure.ai.ml.entities import ManagedOnlineDeployment

    kwargs = dict(name="demo", endpoint_name="ep", model="azureml:m:1", instance_type="Standard_NC24ads_A100_v4")
    assert wire_body(ManagedOnlineDeployment(instance_count=1, **kwargs))["sku"]["capacity"] == 1
    with pytest.raises(WireTypeError, match=r"sku.capacity='1' is a str, the REST model wants int"):
        wire_body(ManagedOnlineDeployment(instance_count="1", **kwargs))


def test_the_dry_run_writes_each_rest_body_with_its_wire_types(tmp_path):
    """The deployment's instance count goes on the wire as an int (a runner that passed a string would fail this dry
    run with WireTypeError), and the plan holds the REST body beside the YAML."""
    overrides = ["experiment=phi4_ultrachat", "dataset=sample", "dry_run=true"]
    run(compose_cfg(overrides), run_dir=tmp_path / "run", task_overrides=overrides)
    plan = tmp_path / "run" / "plan"
    body = json.loads((plan / "deployment.rest.json").read_text())
    assert body["sku"]["capacity"] == 1 and body["properties"]["instanceType"] == "Standard_NC24ads_A100_v4"
    assert json.loads((plan / "compute.rest.json").read_text())["properties"]["properties"]["vmPriority"] == \
        "Dedicated"


@pytest.mark.parametrize("where", ["double", "dry_run"])
def test_keywords_the_sdk_does_not_read_fail_on_serverless_and_job_calls(where, tmp_path):
    """ServerlessEndpointOperations hands its **kwargs to the HTTP pipeline (a TypeError in the transport);
    JobOperations.create_or_update drops them unread. Both refuse a misspelt keyword here."""
    from runner.azureml.finetuning_job import build_finetuning_job

    if where == "double":
        world = AzureWorld()
        ws = world.clients().workspace(world.clients().credential(compose_cfg([]).backend),
                                       compose_cfg(["backend.subscription_id=s", "backend.resource_group=r",
                                                    "backend.workspace_name=w"]).backend)
    else:
        from runner.azureml.planning import planning_clients
        from runner.azureml.spec import DEFAULT_SPEC

        cfg = compose_cfg(["experiment=phi4_mini_serverless", "dry_run=true"])
        clients = planning_clients(cfg, tmp_path / "plan", DEFAULT_SPEC)
        ws = clients.workspace(clients.credential(cfg.backend), cfg.backend)
    with pytest.raises(TypeError, match="polling_intervl"):
        ws.serverless_endpoints.begin_create_or_update(_serverless_endpoint(), polling_intervl=5)
    with pytest.raises(TypeError, match="nme"):
        ws.serverless_endpoints.begin_delete(name="ep-abc", nme="ep-abc")
    with pytest.raises(TypeError, match="timout"):
        ws.serverless_endpoints.get_keys("ep-abc", timout=5)
    job = build_finetuning_job(model="azureml://registries/azureml/models/Phi-4-mini-instruct/versions/1",
                               training_data=str(tmp_path / "t.jsonl"), validation_data=None,
                               hyperparameters={"learning_rate": "0.00002"}, output_model_name="m",
                               display_name="d", experiment_name="e")
    with pytest.raises(TypeError, match="experiment_nme"):
        ws.jobs.create_or_update(job, experiment_nme="x")
    ws.jobs.create_or_update(job, experiment_name="x")  # a keyword the SDK reads
    poller = ws.serverless_endpoints.begin_create_or_update(_serverless_endpoint(), polling_interval=5)
    assert poller.status() == "InProgress"  # azure-core's option: read by the poller


def test_an_endpoint_not_waited_for_has_no_scoring_uri_yet():
    """The double as the service: until its operation has ended, the endpoint is Creating, without a scoring URI;
    finish() (runner/azureml/lro.py) waits and insists on one."""
    from runner.azureml.lro import finish

    world = AzureWorld()
    world.workspace_models["m"] = [type("M", (), {"version": "1"})()]
    ws = world.clients().workspace(world.clients().credential(compose_cfg([]).backend),
                                   compose_cfg(["backend.subscription_id=s", "backend.resource_group=r",
                                                "backend.workspace_name=w"]).backend)
    from azure.ai.ml.entities import ServerlessEndpoint

    endpoint = ServerlessEndpoint(name="ep-abc", auth_mode="key",
                                  model_id=f"azureml://locations/eastus2/workspaces/{world.workspace_id}/models/m/"
                                           f"versions/1")
    poller = ws.serverless_endpoints.begin_create_or_update(endpoint)
    assert ws.serverless_endpoints.get("ep-abc").scoring_uri is None and world.unfinished() == [
        "workspace.serverless_endpoints.begin_create_or_update"]
    created = finish(poller, "creating ep-abc", needs=("scoring_uri",))
    assert created.scoring_uri.startswith("https://ep-abc.") and world.unfinished() == []
    world.poller_errors["workspace.serverless_endpoints.begin_delete"] = RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        finish(ws.serverless_endpoints.begin_delete("ep-abc"), "deleting ep-abc")
    assert "ep-abc" in world.serverless_endpoints  # a failed delete leaves it


@pytest.mark.parametrize("kind, location, refusal", [
    ("project", "swedencentral", r"workspace ws-demo is in swedencentral, where Phi-4-mini-instruct fine-tuned "
                                 r"serverless cannot be deployed: its maas-finetuning-deploy-regions are eastus2, "
                                 r"eastus, northcentralus, westus3, westus, southcentralus"),
    ("default", "eastus2", r"workspace ws-demo is a 'default' workspace: serverless fine-tuning .* hub's project"),
])
def test_a_serverless_fine_tune_outside_the_models_regions_or_a_project_is_refused_before_submission(
        tmp_path, kind, location, refusal):
    """As Azure's serverless sample checks the model's maas-finetuning-deploy-regions tag against the workspace's
    location, but before the job is submitted (the sample checks at deploy, after the training was paid for)."""
    from runner.azureml.backend import AzureMLBackend
    from runner.schema import ConfigError
    from tests.azureml.double import rest_body

    world = AzureWorld()
    world.model_body = rest_body("Phi-4-mini-instruct")
    world.location, world.workspace_kind = location, kind
    overrides = ["experiment=phi4_mini_serverless", "dataset=sample", "backend.subscription_id=s",
                 "backend.resource_group=r", "backend.workspace_name=ws-demo", f"backend.config_path={tmp_path}/x"]
    cfg = compose_cfg(overrides)
    with pytest.raises(ConfigError, match=refusal):
        run(cfg, run_dir=tmp_path / "run", task_overrides=overrides,
            backend=AzureMLBackend(cfg, clients=world.clients()))
    assert world.spending() == [] and "workspace.workspaces.get" in world.names()


@pytest.mark.parametrize("name, problem", [
    ("ultrachat-completion-", "must not end with '-'"), ("ab", "is 2 characters"), ("1abc", "must start with a letter"),
    ("a_bc", "only letters, digits and '-'"), ("a" * 33, "is 33 characters")])
def test_endpoint_and_deployment_names_are_checked_as_the_service_does(name, problem):
    from runner.azureml.checks import check_deployment_name, check_endpoint_name, name_problem
    from runner.schema import ConfigError

    assert problem in name_problem(name)
    with pytest.raises(ConfigError, match="endpoint name"):
        check_endpoint_name(name)
    with pytest.raises(ConfigError, match="deployment.deployment_name"):
        check_deployment_name(name)
    assert name_problem("ultrachat-completion-1795600000") == "" and name_problem("demo") == ""


@pytest.mark.parametrize("overrides, refusal", [
    (["endpoint_name=my-endpoint-"], "endpoint name 'my-endpoint-' .*must not end with '-'"),
    (["deployment.deployment_name=demo-"], "deployment.deployment_name='demo-' must not end with '-'"),
])
def test_the_dry_run_refuses_names_the_service_would(tmp_path, overrides, refusal):
    from runner.schema import ConfigError

    overrides = ["experiment=phi4_ultrachat", "dataset=sample", "dry_run=true", *overrides]
    cfg = compose_cfg(overrides[:-1] if "deployment_name" in overrides[-1] else overrides)
    if "deployment_name" in overrides[-1]:  # with its traffic entry, so that only the name is wrong
        cfg.deployment.deployment_name, cfg.deployment.traffic = "demo-", {"demo-": 100}
    with pytest.raises(ConfigError, match=refusal):
        run(cfg, run_dir=tmp_path / "run", task_overrides=overrides)
    assert not (tmp_path / "run" / "plan" / "compute.yaml").exists()  # refused before anything was planned


def test_only_a_quota_error_falls_back_to_low_priority(tmp_path):
    """A cluster the service refuses for another reason (a bad request) is not retried as low priority."""
    from azure.core.exceptions import HttpResponseError

    from runner.azureml.backend import AzureMLBackend

    world = AzureWorld()
    world.poller_errors["workspace.begin_create_or_update"] = HttpResponseError(
        message="(BadRequest) The specified subnet does not exist")
    overrides = ["experiment=phi4_ultrachat", "dataset=sample", "steps=[connect,model,compute]",
                 "backend.subscription_id=s", "backend.resource_group=r", "backend.workspace_name=w",
                 f"backend.config_path={tmp_path}/x"]
    cfg = compose_cfg(overrides)
    with pytest.raises(HttpResponseError, match="subnet"):
        run(cfg, run_dir=tmp_path / "run", task_overrides=overrides,
            backend=AzureMLBackend(cfg, clients=world.clients()))
    created = [c.args[0] for c in world.find("workspace.begin_create_or_update")]
    assert [str(c.tier) for c in created] == ["dedicated"]  # no low-priority retry


def test_the_dry_runs_operations_have_the_sdks_methods_and_signatures(tmp_path):
    from runner.azureml.planning import planning_clients
    from runner.azureml.spec import DEFAULT_SPEC

    cfg = compose_cfg(["experiment=phi4_ultrachat", "dry_run=true"])
    clients = planning_clients(cfg, tmp_path / "plan", DEFAULT_SPEC)
    ws = clients.workspace(clients.credential(cfg.backend), cfg.backend)
    with pytest.raises(AttributeError):
        ws.compute.submit  # not a ComputeOperations method
    with pytest.raises(TypeError):
        ws.compute.begin_start()  # ComputeOperations.begin_start(name) needs its name
    with pytest.raises(NotImplementedError, match="compute.begin_start"):
        ws.compute.begin_start("gpu-cluster-big")  # real, but nothing the plan answers
