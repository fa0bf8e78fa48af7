"""Keywords the runner passes to Azure are held to what the real client does with them.

MLClient.begin_create_or_update(entity, **kwargs) accepts anything; the SDK hands the keywords to the operations
group its dispatch picks for the entity, which raises on one it does not take. The double and the dry run's
recording client run that same dispatch (runner/azureml/sdk_calls.py). `local=True` is accepted by the SDK and
deploys to local Docker: neither may let it through. Each test mutates the runner's calls at the client seam, as a
bug in the runner would, and sees the run fail.
"""

import functools

import pytest

from runner.azureml.backend import AzureMLBackend
from runner.azureml.sdk_calls import LocalDeploymentRequested, dispatch
from runner.workflow import run
from tests.azureml.double import AzureWorld
from tests.conftest import compose_cfg
from tests.azureml.test_backend import TIMESTAMP, WS_IDS

STEPS = "steps=[connect,model,compute,data,finetune,register,deploy,test,cleanup]"


def _compose(tmp_path, *extra):
    overrides = ["experiment=phi4_ultrachat", "dataset=sample", STEPS,
                 f"backend.config_path={tmp_path / 'none.json'}", *WS_IDS, *extra]
    return compose_cfg(overrides), overrides


def _mutating(clients, mutate):
    """AzureClients whose workspace client is changed by `mutate(client)`: a runner bug at the seam."""
    workspace = clients.workspace

    def changed(credential, backend_cfg):
        client = workspace(credential, backend_cfg)
        mutate(client)
        return client

    clients.workspace = changed
    return clients


def _add_keyword(group, method, **extra):
    def mutate(client):
        owner = client if group is None else getattr(client, group)
        setattr(owner, method, functools.partial(getattr(owner, method), **extra))
    return mutate


def _real_run(tmp_path, mutate=None):
    from tests.azureml.test_plan_equals_run import world_for

    cfg, overrides = _compose(tmp_path)
    world = world_for(cfg)
    clients = world.clients() if mutate is None else _mutating(world.clients(), mutate)
    run(cfg, run_dir=tmp_path / "real", task_overrides=overrides,
        backend=AzureMLBackend(cfg, clients=clients, clock=lambda: TIMESTAMP))
    return world


def _dry_run(tmp_path, mutate=None):
    from runner.azureml.planning import planning_clients

    cfg, overrides = _compose(tmp_path, "dry_run=true")
    backend = AzureMLBackend(cfg, clock=lambda: TIMESTAMP)
    clients = planning_clients(cfg, tmp_path / "plan_run" / "plan", backend.spec_path())
    backend.clients = clients if mutate is None else _mutating(clients, mutate)
    return run(cfg, run_dir=tmp_path / "plan_run", task_overrides=overrides, backend=backend)


def test_the_unmutated_runner_passes_both_ways(tmp_path):
    world = _real_run(tmp_path)
    assert "workspace.online_deployments.begin_create_or_update" in world.spending()
    _dry_run(tmp_path)


@pytest.mark.parametrize("way", [_real_run, _dry_run])
def test_an_unknown_keyword_through_mlclient_begin_create_or_update_fails(tmp_path, way):
    # compute.begin_create_or_update(compute) and online_endpoints.begin_create_or_update(endpoint, *, local)
    # take no other keyword: the SDK's dispatch hands `retries` on and the group raises
    with pytest.raises(TypeError, match="unexpected keyword argument 'retries'"):
        way(tmp_path, _add_keyword(None, "begin_create_or_update", retries=3))


@pytest.mark.parametrize("way", [_real_run, _dry_run])
def test_local_true_on_online_deployments_fails_before_anything_is_deployed(tmp_path, way):
    with pytest.raises(LocalDeploymentRequested, match="local=True.*local Docker"):
        way(tmp_path, _add_keyword("online_deployments", "begin_create_or_update", local=True))


def _local_for_endpoints(client):
    from azure.ai.ml.entities import OnlineEndpoint

    original = client.begin_create_or_update

    def begin_create_or_update(entity, **kwargs):
        if isinstance(entity, OnlineEndpoint):
            kwargs["local"] = True
        return original(entity, **kwargs)

    client.begin_create_or_update = begin_create_or_update


@pytest.mark.parametrize("way", [_real_run, _dry_run])
def test_local_true_through_mlclient_for_the_endpoint_fails(tmp_path, way):
    # online_endpoints.begin_create_or_update takes `local`: the SDK would create a local Docker endpoint
    with pytest.raises(LocalDeploymentRequested, match="begin_create_or_update was called with local=True"):
        way(tmp_path, _local_for_endpoints)


def test_the_double_does_not_record_a_refused_deployment(tmp_path):
    from tests.azureml.test_plan_equals_run import world_for

    cfg, overrides = _compose(tmp_path)
    world = world_for(cfg)
    clients = _mutating(world.clients(), _add_keyword("online_deployments", "begin_create_or_update",
                                                     vscode_debug=True))
    with pytest.raises(LocalDeploymentRequested):
        run(cfg, run_dir=tmp_path / "real", task_overrides=overrides,
            backend=AzureMLBackend(cfg, clients=clients, clock=lambda: TIMESTAMP))
    assert "workspace.online_deployments.begin_create_or_update" not in world.spending()
    assert world.spending()[-1] == "workspace.online_endpoints.begin_delete"  # the endpoint is not left billing


def test_dispatch_follows_the_sdk_for_each_entity_type():
    from azure.ai.ml.entities import AmlCompute, ManagedOnlineDeployment, ManagedOnlineEndpoint, Model

    assert dispatch("begin_create_or_update", AmlCompute(name="c", size="Standard_ND96asr_v4"), {})[:2] == (
        "compute", "begin_create_or_update")
    assert dispatch("begin_create_or_update", ManagedOnlineEndpoint(name="e"), {"local": False})[:2] == (
        "online_endpoints", "begin_create_or_update")
    # online_deployments.begin_create_or_update has **kwargs and ignores what it does not know, as the SDK does
    assert dispatch("begin_create_or_update", ManagedOnlineDeployment(name="d", endpoint_name="e"),
                    {"skip_script_validation": True})[2] == {"skip_script_validation": True}
    model = Model(name="m", path="azureml://jobs/j/outputs/o")
    assert dispatch("create_or_update", model, {})[:2] == ("models", "create_or_update")
    with pytest.raises(TypeError, match="'x'"):  # the SDK's Model branch takes no keyword at all
        dispatch("create_or_update", model, {"x": 1})
