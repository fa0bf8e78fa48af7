"""A call-recording stand-in for Azure, held to the real azure-ai-ml shapes: MLClient (workspace and registry), the
credentials, and the answers.

- Every operations group of MLClient (models, components, compute, jobs, online_endpoints, ...) and MLClient's own
  methods are `unittest.mock.create_autospec` of azure-ai-ml's classes: a method the SDK does not have, or an
  argument its signature does not take, fails the test as it would fail against Azure. Constructing the client and
  `MLClient.from_config` are checked against the real signatures too.
- Long-running operations answer with autospecs of azure-core's `LROPoller` (wait / result / done / status).
- The registry's foundation model is built by the SDK's own deserializer from a REST body shaped like the registry's
  (tests/fixtures/azureml/*.rest.json): `Model._from_rest_object(ModelVersion._deserialize(body))`, exactly what
  `ModelOperations.get` does for a registry. That drops the system metadata, as the real SDK does. A label is
  resolved as the SDK resolves it (the newest created version, archived ones included); the registry client's
  models group holds an autospec of the SDK's registry service client whose `send_request` answers the raw GET
  of a version with its REST body (what `get_registry_versioned_asset` reads).
- Keywords through MLClient.(begin_)create_or_update run the SDK's own dispatch to autospecs of the operations
  classes (runner/azureml/sdk_calls.py); `local=True` (local Docker) is refused.
- A failed pipeline job makes `jobs.stream` raise the SDK's `JobException`, as JobOperations.stream does.
- The other answers are the SDK's entities (AmlCompute, VmSize, PipelineJob, Workspace, Model, ManagedOnlineEndpoint).

`AzureWorld` holds what the service would answer and records every call as (name, args, kwargs) in `world.calls`,
in order, with args as the runner passed them; `world.answer(name, args, kwargs)` is the one place calls are
recorded and answered (a test may wrap or override it). `world.clients()` is an AzureClients whose MLClient and
credential classes are these stand-ins, so the runner's real login/workspace logic runs in between.
"""

import copy
import inspect
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Iterable, List, Optional
from unittest import mock

import yaml

from runner.azureml.spec import DEFAULT_SPEC

from tests.conftest import REPO

# Everything the stand-in serves is the repository's own: the component contract the runner ships, and the registry
# models' REST bodies recorded under tests/fixtures/azureml/.
PIPELINE_SPEC = DEFAULT_SPEC
FIXTURES = REPO / "tests" / "fixtures" / "azureml"
PHI3_SPEC = FIXTURES / "phi-3-mini-4k-instruct.model.yaml"  # the registry spec's facts, as YAML (tags as dicts)

# The registry's GET .../models/<name>/versions/<version> bodies, recorded from the models' registry specs:
#   Phi-3-mini-4k-instruct 15: archived; allow lists in tags (the oldest form) and in properties; system metadata.
#   Phi-3.5-mini-instruct 6:   archived; allow lists in properties (finetune-recommended-sku) and system metadata.
#   Phi-4 8:                   current; allow lists only in system metadata (SKU.*RecommendedSkus), which the SDK drops.
#   Phi-4-mini-instruct:       current; fine-tunes serverless. Made here in the registry's shape (its registry spec is
#                              not published): no allow lists, no model_specific_defaults; version 3, the newest public
#                              catalog data names (a stand-in); tag maas-finetuning-deploy-regions as the notebook lists.
REST_BODIES = {
    "Phi-3-mini-4k-instruct": FIXTURES / "phi-3-mini-4k-instruct.rest.json",
    "Phi-3.5-mini-instruct": FIXTURES / "phi-3.5-mini-instruct.rest.json",
    "Phi-4": FIXTURES / "phi-4.rest.json",
    "Phi-4-mini-instruct": FIXTURES / "phi-4-mini-instruct.rest.json",
}

# The creation time of a fixture body without systemData (they were recorded from specs, which have none); a
# version added with add_model_version names its own.
CREATED_AT = "2025-01-01T00:00:00Z"

# Where a registry body may keep the allow lists (see runner/azureml/tags.py).
LIST_TAGS = ("finetune_compute_allow_list", "inference_compute_allow_list")
LIST_PROPERTIES = ("finetune-recommended-sku", "inference-recommended-sku")
LIST_SYSTEM_METADATA = ("SKU", "supportedComputes")

# The subset of calls that create, submit or delete something (cost money or change the workspace).
SPENDING = (
    "workspace.begin_create_or_update",
    "workspace.create_or_update",
    "workspace.jobs.create_or_update",
    "workspace.models.create_or_update",
    "workspace.compute.begin_create_or_update",
    "workspace.online_endpoints.begin_create_or_update",
    "workspace.online_deployments.begin_create_or_update",
    "workspace.online_endpoints.begin_delete",
    "workspace.compute.begin_delete",
    "workspace.serverless_endpoints.begin_create_or_update",
    "workspace.serverless_endpoints.begin_delete",
)


class Call(tuple):
    @property
    def name(self) -> str:
        return self[0]

    @property
    def args(self) -> tuple:
        return self[1]

    @property
    def kwargs(self) -> dict:
        return self[2]


# ---- registry models, as the SDK builds them -------------------------------------------------------------------


def rest_body(name: str = "Phi-3-mini-4k-instruct") -> Dict[str, Any]:
    """A fresh copy of the registry's REST body for model `name` (tests/fixtures/azureml/*.rest.json)."""
    return json.loads(REST_BODIES[name].read_text())


def keep_lists_only_in(body: Dict[str, Any], *places: str) -> Dict[str, Any]:
    """The body with its allow lists removed from every place but `places` ("tags", "properties",
    "system_metadata"): how registry models of different ages carry them."""
    props = body["properties"]
    if "tags" not in places:
        for key in LIST_TAGS:
            props.get("tags", {}).pop(key, None)
    if "properties" not in places:
        for key in LIST_PROPERTIES:
            props.get("properties", {}).pop(key, None)
    if "system_metadata" not in places:
        for key in LIST_SYSTEM_METADATA:
            (props.get("systemMetadata") or {}).pop(key, None)
    return body


def model_from_rest(body: Dict[str, Any]):
    """The azure.ai.ml Model entity that `MLClient(registry_name=...).models.get` returns for this REST body: the
    registry path of ModelOperations deserializes the arm ModelVersion and hands it to Model._from_rest_object."""
    from azure.ai.ml._restclient.arm_ml_service.models import ModelVersion
    from azure.ai.ml.entities import Model

    return Model._from_rest_object(ModelVersion._deserialize(copy.deepcopy(body), []))


def container_from_rest(body: Dict[str, Any]):
    """The entity `models.list()` (no name) yields for a registry model: the SDK's container, name and latest
    version only (Model._from_container_rest_object of the arm ModelContainer)."""
    from azure.ai.ml._restclient.arm_ml_service.models import ModelContainer
    from azure.ai.ml.entities import Model

    name = body["id"].split("/models/")[1].split("/")[0]
    container = {"id": f"azureml://registries/azureml/models/{name}", "name": name,
                 "properties": {"latestVersion": body["name"], "isArchived": body["properties"].get("isArchived")}}
    return Model._from_container_rest_object(ModelContainer._deserialize(container, []))


def registry_model(name: str = "Phi-3-mini-4k-instruct", *, lists_in: Optional[Iterable[str]] = None):
    body = rest_body(name)
    if lists_in is not None:
        keep_lists_only_in(body, *lists_in)
    return model_from_rest(body)


def registry_phi3_model():
    """Phi-3-mini-4k-instruct 15 as azure-ai-ml returns it from the registry."""
    return registry_model("Phi-3-mini-4k-instruct")


def job_failed_error(job_name: str, message: str):
    """What JobOperations.stream raises when the job ends Failed (azure/ai/ml/operations/_job_ops_helper.py)."""
    from azure.ai.ml.exceptions import ErrorCategory, ErrorTarget, JobException

    error = {"error": {"code": "UserError", "message": message}}
    return JobException(message="Exception : \n {} ".format(json.dumps(error, indent=4)), target=ErrorTarget.JOB,
                        no_personal_data_message="Exception raised on failed job.",
                        error_category=ErrorCategory.SYSTEM_ERROR)


def _public_methods(cls) -> List[str]:
    return [name for name, member in inspect.getmembers(cls)
            if not name.startswith("_") and callable(member)
            and not isinstance(inspect.getattr_static(cls, name), property)]


def _tier(tier: Any) -> str:
    """'Dedicated' / 'dedicated', 'LowPriority' / 'low_priority': one name for a tier."""
    return str(tier).lower().replace("_", "")


class AzureWorld:
    def __init__(self, *, job_name: str = "sincere_kettle_42", tracking_uri: str = "file:///nonexistent"):
        from azure.ai.ml import load_component
        from azure.ai.ml.entities import VmSize

        self.calls: List[Call] = []
        self.model_body = rest_body("Phi-3-mini-4k-instruct")  # what the registry serves for the foundation model
        # the registry's other models (models.get by name, models.list), the foundation model's entry replaced by
        # model_body
        # (the recorded ones: Phi-4-mini-instruct's body, made here, is served when it is the foundation model)
        self.registry_bodies: Dict[str, Dict[str, Any]] = {name: rest_body(name) for name in REST_BODIES
                                                           if name != "Phi-4-mini-instruct"}
        self.component = load_component(source=str(PIPELINE_SPEC))
        self.computes: Dict[str, Any] = {}
        self.sizes = [VmSize(name="Standard_ND96asr_v4", gpus=8), VmSize(name="Standard_NC24ads_A100_v4", gpus=1),
                      VmSize(name="Standard_ND40rs_v2", gpus=8)]
        self.failing_tiers: set = set()  # tiers whose cluster creation fails (e.g. {"dedicated"}: no quota)
        self.poller_errors: Dict[str, Exception] = {}  # call name → what its poller's wait()/result() raises
        self.in_progress_polls = 3  # how many looks at a poller say InProgress before the service is done
        self.pollers: List[Dict[str, Any]] = []
        self.job_name = job_name
        # the evaluate command job's name: the id of its MLflow run in the workspace (log_evaluation makes one)
        self.evaluate_job_name = "quiet_lamp_7"
        self.job_status = "Completed"  # "Failed": jobs.stream raises the SDK's JobException, jobs.get says Failed
        self.job_error = "Out of memory on node 0 (CUDA error)"
        self.stream_errors: List[BaseException] = []  # raised by the next jobs.stream calls, in order
        self.tracking_uri = tracking_uri
        self.response: Any = '[{"0": "Hello from the endpoint"}]'
        self.token_error: Optional[Exception] = None
        self.created: List[Any] = []
        self.rest_requests: List[tuple] = []  # raw registry GETs through the registry service client
        self.rest_error: Optional[Exception] = None
        # other versions of a registry model beside the one served (add_model_version); label resolution picks the
        # newest created among all of them
        self.other_versions: Dict[str, List[Dict[str, Any]]] = {}
        # finetuning jobs (finetune.route=finetuning_job) and what they register, serverless endpoints
        self.location, self.workspace_id = "eastus2", "0f0e0d0c-aaaa-bbbb-cccc-123456789abc"
        self.workspace_kind = "project"  # an AI Foundry hub's project ("default": a plain Azure ML workspace)
        self.finetuning_jobs: Dict[str, Any] = {}
        self.workspace_models: Dict[str, List[Any]] = {}  # name -> versions, oldest first
        self.model_files: Dict[tuple, Any] = {}  # (name, version) -> a folder models.download copies
        self.serverless_endpoints: Dict[str, Any] = {}
        self.serverless_scoring_uri: Optional[str] = None  # e.g. a test's 127.0.0.1 server; None: an Azure URI
        self.serverless_keys = ("PRIMARY-KEY-VALUE", "SECONDARY-KEY-VALUE")

    @property
    def model(self):
        """The foundation model as the SDK would build it from `model_body` (a fresh entity each time)."""
        return model_from_rest(self.model_body)

    # ---- the classes handed to AzureClients ---------------------------------------------------------------
    def poller(self, name: str, result: Any = None, error: Optional[Exception] = None, on_done=None):
        """An autospec of azure-core's LROPoller, as the service's operations behave: InProgress for
        `in_progress_polls` looks (done() False, status() "InProgress") unless waited for; wait()/result() (recorded
        as `<name>.wait` / `.result`) poll it to its end, Succeeded (then `on_done()` makes the operation's effect
        visible, e.g. the endpoint's scoring URI) or Failed (raising the operation's error). Every poller is kept in
        `world.pollers`; `unfinished()` names those nobody waited for."""
        from azure.core.polling import LROPoller

        poller = mock.create_autospec(LROPoller, instance=True)
        world = self
        state = {"name": name, "looks": 0, "status": "InProgress", "waited": False}

        def settle():
            if state["status"] == "InProgress":
                failure = error or world.poller_errors.get(name)
                state["status"] = "Failed" if failure else "Succeeded"
                if not failure and on_done is not None:
                    on_done()

        def look():
            state["looks"] += 1
            if state["looks"] > world.in_progress_polls:  # the service finishes on its own, in time
                settle()
            return state["status"]

        def finish(method):
            def run(timeout=None):
                world.calls.append(Call((f"{name}.{method}", (), {})))
                state["waited"] = True
                settle()
                failure = error or world.poller_errors.get(name)
                if failure:
                    raise failure
                return result if method == "result" else None
            return run

        poller.wait.side_effect = finish("wait")
        poller.result.side_effect = finish("result")
        poller.done.side_effect = lambda: look() != "InProgress"
        poller.status.side_effect = look
        self.pollers.append(state)
        return poller

    def unfinished(self) -> List[str]:
        """The long-running operations the runner started and never waited for."""
        return [p["name"] for p in self.pollers if not p["waited"]]

    def _operations(self, cls, prefix: str):
        ops = mock.create_autospec(cls, instance=True)
        for method in _public_methods(cls):
            call_name = f"{prefix}.{method}"
            getattr(ops, method).side_effect = (lambda n: lambda *args, **kwargs: self.answer(n, args, kwargs))(
                call_name)
        return ops

    def _mlclient(self, workspace_name=None, resource_group_name=None, registry_name=None):
        from azure.ai.ml import MLClient

        prefix = "registry" if registry_name else "workspace"
        client = mock.create_autospec(MLClient, instance=True)
        for method in _public_methods(MLClient):
            if not inspect.ismethod(getattr(MLClient, method)):  # classmethods (from_config) are not the instance's
                getattr(client, method).side_effect = (lambda n: lambda *a, **k: self.answer(n, a, k))(
                    f"{prefix}.{method}")
        from runner.azureml.sdk_calls import operation_groups

        for group, cls in operation_groups().items():
            setattr(client, group, self._operations(cls, f"{prefix}.{group}"))
        if registry_name:  # what ModelOperations holds for a registry: the service client it GETs versions with
            client.models._registry_service_client = self._registry_service_client()
            client.models._resource_group_name = "registry-rg"
            client.models._registry_name = registry_name
        client.workspace_name = workspace_name
        client.resource_group_name = resource_group_name
        return client

    def _registry_service_client(self):
        """An autospec of the registry's hybrid ARM client (MachineLearningServicesMgmtClient) whose send_request
        answers the registry's data-plane GETs of model versions with their raw REST bodies (404 when unknown);
        each request is kept in `rest_requests`. `rest_error`, when set, is raised instead (network down)."""
        from azure.ai.ml._restclient.arm_ml_service import MachineLearningServicesMgmtClient
        from azure.core.rest import HttpResponse

        client = mock.create_autospec(MachineLearningServicesMgmtClient, instance=True)
        client._config = SimpleNamespace(subscription_id="registry-sub")
        world = self

        def send_request(request, *, stream=False, **kwargs):
            world.rest_requests.append((request.method, request.url))
            if world.rest_error is not None:
                raise world.rest_error
            response = mock.create_autospec(HttpResponse, instance=True)
            found = re.search(r"/registries/[^/]+/models/([^/]+)/versions/([^/?]+)", request.url)
            body = None
            if request.method == "GET" and found:
                body = next((b for b in world.model_versions(found.group(1)) if b["name"] == found.group(2)), None)
            response.status_code = 200 if body is not None else 404
            response.reason = "OK" if body is not None else "Not Found"
            response.text.return_value = json.dumps(body) if body is not None else '{"error": {"code": "NotFound"}}'
            response.json.return_value = copy.deepcopy(body)
            if body is None:
                from azure.core.exceptions import HttpResponseError

                response.raise_for_status.side_effect = HttpResponseError(message="404 Not Found")
            return response

        client.send_request.side_effect = send_request
        return client

    def clients(self, **kwargs):
        from azure.ai.ml import MLClient

        from runner.azureml.clients import AzureClients

        world = self

        class FakeCredential:
            def __init__(self):
                world.calls.append(Call(("DefaultAzureCredential", (), {})))

            def get_token(self, *scopes, claims=None, tenant_id=None, enable_cae=False, **kwargs):
                world.calls.append(Call(("DefaultAzureCredential.get_token", scopes, {})))
                if world.token_error:
                    raise world.token_error
                return SimpleNamespace(token="SECRET-TOKEN-VALUE", expires_on=0)

        class FakeInteractive:
            def __init__(self):
                world.calls.append(Call(("InteractiveBrowserCredential", (), {})))

        client_cls = mock.create_autospec(MLClient)  # the constructor's and from_config's real signatures
        init = inspect.signature(MLClient)

        def construct(*args, **kwargs):
            bound = init.bind(*args, **kwargs).arguments
            ids = {key: bound.get(key) for key in ("subscription_id", "resource_group_name", "workspace_name",
                                                   "registry_name")}
            world.calls.append(Call(("MLClient", (type(bound["credential"]).__name__,), ids)))
            return world._mlclient(ids["workspace_name"], ids["resource_group_name"], ids["registry_name"])

        def from_config(credential, *, path=None, file_name=None, **kwargs):
            world.calls.append(Call(("MLClient.from_config", (), {"path": path})))
            data = yaml.safe_load(Path(path).read_text())
            return client_cls(credential, subscription_id=data["subscription_id"],
                              resource_group_name=data["resource_group"], workspace_name=data["workspace_name"])

        client_cls.side_effect = construct
        client_cls.from_config.side_effect = from_config

        class DoubleClients(AzureClients):
            def post_json(self, url, body, headers, timeout):
                """A serverless endpoint's HTTP API: the real HTTP client when the world points the endpoint at a
                test's own server (serverless_scoring_uri), else answered here, recorded as `POST <path>`."""
                if world.serverless_scoring_uri:
                    return super().post_json(url, body, headers, timeout)
                world.calls.append(Call((f"POST {url.split('.azure.com', 1)[-1]}", (body,), {"headers": headers})))
                key = str(headers.get("Authorization", "")).removeprefix("Bearer ")
                if key not in world.serverless_keys:
                    raise AssertionError(f"{url}: 401, the endpoint's key was not sent")
                return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from serverless"},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24}}

        kwargs.setdefault("environ", {})
        return DoubleClients(mlclient_cls=client_cls, default_credential_cls=FakeCredential,
                             interactive_credential_cls=FakeInteractive, **kwargs)

    # ---- answers ------------------------------------------------------------------------------------------
    def answer(self, name: str, args: tuple, kwargs: dict) -> Any:
        """Record the call (as the runner made it) and answer it as the service would."""
        from azure.ai.ml.entities import Model, PipelineJob, Workspace
        from azure.ai.ml.entities._job.job_service import JobService
        from azure.core.exceptions import ResourceNotFoundError

        self.check_keywords(name, args, kwargs)
        self.check_wire(name, args, kwargs)
        self.calls.append(Call((name, args, kwargs)))
        if name == "registry.models.get":
            return self._get_model(*args, **kwargs)
        if name == "registry.models.list":
            from azure.ai.ml.constants import ListViewType

            requested = args[0] if args else kwargs.get("name")
            everything = kwargs.get("list_view_type") == ListViewType.ALL
            if requested:  # the versions of one model
                return [model_from_rest(b) for b in self.model_versions(requested)
                        if everything or not b["properties"].get("isArchived")]
            bodies = [b for b in self._registry_bodies() if everything or not b["properties"].get("isArchived")]
            return [container_from_rest(b) for b in bodies]
        if name == "registry.components.get":
            return self.component
        if name == "workspace.compute.get":
            cluster = args[0] if args else kwargs["name"]
            if cluster not in self.computes:
                raise ResourceNotFoundError(f"compute {cluster} not found")
            return self.computes[cluster]
        if name == "workspace.compute.list_sizes":
            return list(self.sizes)
        if name == "workspace.begin_create_or_update":
            from azure.ai.ml.entities import AmlCompute, ManagedOnlineEndpoint

            entity = args[0] if args else kwargs["entity"]
            if isinstance(entity, AmlCompute):
                from azure.ai.ml._restclient.arm_ml_service.models import VmPriority
                from azure.core.exceptions import HttpResponseError

                priority = entity._to_rest_object().properties.properties.vm_priority  # what goes on the wire
                if priority not in [p.value for p in VmPriority]:
                    raise HttpResponseError(message=f"(BadRequest) vmPriority {priority!r} is not one of "
                                                    f"{[p.value for p in VmPriority]}")
                if _tier(entity.tier) in {_tier(t) for t in self.failing_tiers}:
                    return self.poller(name, error=HttpResponseError(message=(
                        f"(QuotaExceeded) Operation could not be completed as it results in exceeding approved "
                        f"{entity.tier} cores quota for {entity.size}")))
                self.computes[entity.name] = AmlCompute(name=entity.name, size=entity.size, tier=entity.tier,
                                                        provisioning_state="Succeeded")
                result = self.computes[entity.name]
            elif isinstance(entity, ManagedOnlineEndpoint):
                result = ManagedOnlineEndpoint(
                    name=entity.name, auth_mode=entity.auth_mode, traffic=dict(entity.traffic or {}),
                    scoring_uri=f"https://{entity.name}.eastus.inference.ml.azure.com/score")
            else:
                result = entity
            self.created.append(entity)
            return self.poller(name, result=result)
        if name == "workspace.jobs.create_or_update" and getattr(args[0] if args else kwargs.get("job"), "type",
                                                                 None) == "finetuning":
            return self._submit_finetuning_job(args[0] if args else kwargs["job"])
        if name == "workspace.jobs.get" and (args[0] if args else kwargs["name"]) in self.finetuning_jobs:
            return self._finetuning_job(args[0] if args else kwargs["name"])
        if name == "workspace.models.get":
            return self._workspace_model(*args, **kwargs)
        if name == "workspace.models.download":
            return self._download_model(*args, **kwargs)
        if name.startswith("workspace.serverless_endpoints."):
            return self._serverless(name.rsplit(".", 1)[1], args, kwargs)
        if name == "workspace.jobs.create_or_update" and getattr(args[0] if args else kwargs.get("job"), "type",
                                                                 None) == "command":  # the evaluate job
            submitted = copy.copy(args[0] if args else kwargs["job"])
            submitted.name = self.evaluate_job_name
            submitted._status = "Running"  # what the service answers for a job just submitted
            return submitted
        if name == "workspace.jobs.create_or_update":
            url = f"https://ml.azure.com/runs/{self.job_name}"
            return PipelineJob(name=self.job_name, status="Running", services={"Studio": JobService(endpoint=url)})
        if name == "workspace.jobs.stream":
            if self.stream_errors:  # the stream breaks (network, Ctrl-C); the job runs on
                raise self.stream_errors.pop(0)
            if self.job_status == "Failed":
                raise job_failed_error(args[0] if args else kwargs["name"], self.job_error)
            if self.job_status == "Running":  # stream returns when the job has ended
                self.job_status = "Completed"
            return None
        if name == "workspace.jobs.get":
            return PipelineJob(name=args[0] if args else kwargs["name"], status=self.job_status)
        if name == "workspace.workspaces.get":
            ws_name = (args[0] if args else kwargs.get("name")) or "ws"
            if self.workspace_kind == "project":  # WorkspaceOperations.get answers a Project for kind 'project'
                from azure.ai.ml.entities import Project

                return Project(name=ws_name, location=self.location, mlflow_tracking_uri=self.tracking_uri,
                               workspace_id=self.workspace_id, hub_id=("/subscriptions/sub/resourceGroups/rg/providers/"
                                                                       "Microsoft.MachineLearningServices/workspaces/hub"))
            return Workspace(name=ws_name, mlflow_tracking_uri=self.tracking_uri, location=self.location,
                             workspace_id=self.workspace_id)
        if name == "workspace.models.create_or_update":
            model = args[0] if args else kwargs["model"]
            return Model(id=f"azureml:/subscriptions/sub/resourceGroups/rg/providers/"
                            f"Microsoft.MachineLearningServices/workspaces/ws/models/{model.name}/versions/"
                            f"{model.version}", name=model.name, version=model.version, path=model.path,
                         type=model.type)
        if name == "workspace.online_deployments.begin_create_or_update":
            return self.poller(name, result=args[0] if args else kwargs["deployment"])
        if name == "workspace.online_endpoints.invoke":
            return self.response
        if name in ("workspace.online_endpoints.begin_delete", "workspace.compute.begin_delete"):
            return self.poller(name)
        raise AssertionError(f"the test double has no answer for {name}")

    def _get_model(self, name: str, version: Optional[str] = None, label: Optional[str] = None):
        """ModelOperations.get for a registry, as azure-ai-ml 1.35.2 does it: a label is resolved by the operations
        group's `_managed_label_resolver` (only "latest"), which lists the name's versions newest-created first and
        takes the first (`_get_latest`: $orderBy=createdtime desc, $top=1, no listViewType, so archived versions
        count), then GETs that version; a version is one GET (404: ResourceNotFoundError)."""
        from azure.ai.ml.exceptions import ValidationException
        from azure.core.exceptions import ResourceNotFoundError

        if version and label:
            raise ValidationException(message="Cannot specify both version and label.",
                                      no_personal_data_message="Cannot specify both version and label.")
        if label:
            if label != "latest":
                msg = f"Asset {name} with version label {label} does not exist in registry."
                raise ValidationException(message=msg, no_personal_data_message=msg)
            versions = self.model_versions(name)
            if not versions:
                msg = f"Asset {name} does not exist in registry azureml."
                raise ValidationException(message=msg, no_personal_data_message=msg)
            version = versions[0]["name"]  # a REST model version's `name` is its version
        if not version:
            raise ValidationException(message="Must provide either version or label",
                                      no_personal_data_message="Must provide either version or label")
        for body in self.model_versions(name):
            if body["name"] == str(version):
                return model_from_rest(body)
        raise ResourceNotFoundError(f"model {name}:{version} not found in the registry")

    def model_versions(self, name: str) -> List[Dict[str, Any]]:
        """Every version of model `name` the registry holds (archived included), newest created first."""
        current = self._registry_body(name)
        bodies = ([current] if current is not None else []) + list(self.other_versions.get(name, []))
        return sorted(bodies, key=lambda b: (b.get("systemData") or {}).get("createdAt") or CREATED_AT,
                      reverse=True)

    def add_model_version(self, name: str, version: str, *, created_at: str, archived: bool = False,
                          like: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Another version of `name` in the registry (a copy of its served body unless `like`), created at
        `created_at` (ISO 8601); returns its body, to be changed further."""
        body = copy.deepcopy(like or self._registry_body(name) or rest_body(name))
        body["name"] = str(version)
        body["id"] = body["id"].rsplit("/versions/", 1)[0] + f"/versions/{version}"
        body["systemData"] = {**(body.get("systemData") or {}), "createdAt": created_at}
        body["properties"]["isArchived"] = archived
        self.other_versions.setdefault(name, []).append(body)
        return body

    @staticmethod
    def check_keywords(name: str, args: tuple, kwargs: dict) -> None:
        """What the real client does with keywords the autospec's `**kwargs` lets through: MLClient's own
        (begin_)create_or_update hands them to the operations group its dispatch picks, which raises TypeError on
        one it does not take; and no call may ask for a local Docker deployment (`local=True`)."""
        from runner.azureml.sdk_calls import check_kwargs_read, dispatch, operation_groups, refuse_local

        method = name.split(".", 1)[1]
        if method in ("begin_create_or_update", "create_or_update"):  # MLClient's own methods
            entity = args[0] if args else kwargs.get("entity")
            dispatch(method, entity, {k: v for k, v in kwargs.items() if k != "entity"})
        refuse_local(name, kwargs)
        parts = name.split(".")
        if len(parts) == 3 and parts[1] in operation_groups():  # what the group's **kwargs really reads
            check_kwargs_read(name, getattr(operation_groups()[parts[1]], parts[2]), kwargs)

    @staticmethod
    def check_wire(name: str, args: tuple, kwargs: dict) -> None:
        """The REST body the SDK would send for a created entity, its field types checked against the REST model
        (runner/azureml/wire.py): the service refuses a string where it reads an int."""
        from azure.ai.ml.entities import AmlCompute, Model, OnlineDeployment, OnlineEndpoint, ServerlessEndpoint
        from azure.ai.ml.entities._job.finetuning.finetuning_job import FineTuningJob

        from runner.azureml.wire import wire_body

        if name not in SPENDING or "delete" in name:
            return
        for value in list(args) + list(kwargs.values()):
            if isinstance(value, (AmlCompute, Model, OnlineDeployment, OnlineEndpoint, ServerlessEndpoint,
                                  FineTuningJob)):
                wire_body(value)

    # ---- finetuning jobs, the models they register, serverless endpoints ---------------------------------------
    def _submit_finetuning_job(self, job):
        """What the service answers for a `type: finetuning` job: the job as the SDK reads it back from the wire
        (its own REST conversion both ways), named and Running. Hyperparameters must be strings, as the job's schema
        says (CustomModelFineTuningSchema: Dict(Str, Str))."""
        from azure.ai.ml.entities._job.finetuning.finetuning_job import FineTuningJob
        from azure.ai.ml.entities._job.job_service import JobService
        from azure.ai.ml.exceptions import ValidationException

        bad = {k: v for k, v in (job.hyperparameters or {}).items() if not isinstance(v, str)}
        if bad:
            raise ValidationException(message=f"hyperparameters {bad}: Not a valid string.",
                                      no_personal_data_message="Not a valid string.")
        if job.validation_data is None and job.training_data is None:
            raise ValidationException(message="training_data is required", no_personal_data_message="training_data")
        rest = job._to_rest_object()
        rest.name = self.job_name
        rest.properties.status = "Running"
        rest.properties.services = {"Studio": JobService(endpoint=f"https://ml.azure.com/runs/{self.job_name}")
                                    ._to_rest_object()}
        submitted = FineTuningJob._load_from_rest(rest)
        self.finetuning_jobs[self.job_name] = submitted
        return submitted

    def _finetuning_job(self, job_name: str):
        """The job as jobs.get reads it; once Completed, the model its registered_model output names exists."""
        from azure.ai.ml.entities import Model

        job = copy.copy(self.finetuning_jobs[job_name])
        job._status = self.job_status
        output = job.outputs["registered_model"]
        if self.job_status == "Completed" and not any(
                getattr(m, "path", "").startswith(f"azureml://jobs/{job_name}/")
                for m in self.workspace_models.get(output.name, [])):
            versions = self.workspace_models.setdefault(output.name, [])
            version = str(len(versions) + 1)
            versions.append(Model(
                id=f"/subscriptions/sub/resourceGroups/rg/providers/Microsoft.MachineLearningServices/workspaces/"
                   f"ws/models/{output.name}/versions/{version}", name=output.name, version=version,
                type="mlflow_model", path=f"azureml://jobs/{job_name}/outputs/registered_model"))
        return job

    def _workspace_model(self, name, version=None, label=None, **kwargs):
        from azure.core.exceptions import ResourceNotFoundError

        versions = self.workspace_models.get(name) or []
        found = [m for m in versions if m.version == str(version)] if version else (
            versions[-1:] if label == "latest" else [])
        if not found:
            raise ResourceNotFoundError(f"model {name} (version {version}, label {label}) not found in the workspace")
        return found[0]

    def _download_model(self, name, version, download_path="."):
        """ModelOperations.download as azure-ai-ml 1.x does it: the version's files (here `model_files[(name,
        version)]`, a folder) land in <download_path>/<name>/<the asset folder's base name>/; an unknown version is
        the service's ResourceNotFoundError."""
        import shutil

        self._workspace_model(name, version)  # the SDK GETs the version first
        files = self.model_files.get((name, str(version)))
        if files is None:
            raise AssertionError(f"the test double holds no files for model {name}:{version} (world.model_files)")
        shutil.copytree(files, Path(download_path) / name / Path(files).name, dirs_exist_ok=True)

    def _serverless(self, method: str, args: tuple, kwargs: dict):
        """ServerlessEndpointOperations as the service answers it, with the SDK's own refusal of a model_id that
        names a registry version (REGISTRY_VERSION_PATTERN) and the location it fills in from the workspace."""
        import re

        from azure.ai.ml.constants._common import REGISTRY_VERSION_PATTERN
        from azure.ai.ml.entities import EndpointAuthKeys, ServerlessEndpoint
        from azure.ai.ml.exceptions import ValidationException
        from azure.core.exceptions import ResourceNotFoundError

        name = f"workspace.serverless_endpoints.{method}"
        if method == "begin_create_or_update":
            endpoint = args[0] if args else kwargs["endpoint"]
            registry_model = re.match(r"^azureml://registries/([^/]+)/models/([^/]+)$", endpoint.model_id)
            if registry_model and registry_model.group(2) in {model_from_rest(b).name for b in self._registry_bodies()}:
                ours = True  # a registry model by name (the evaluate step's base endpoint): the service serves it
            elif re.match(REGISTRY_VERSION_PATTERN, endpoint.model_id):
                raise ValidationException(message=f"The given model_id {endpoint.model_id} points to a specific "
                                          f"model version, which is not supported.", no_personal_data_message="x")
            else:
                ours = re.match(r"^azureml://locations/([^/]+)/workspaces/([^/]+)/models/([^/]+)/versions/([^/]+)$",
                                endpoint.model_id)
            if ours is not True and (not ours or ours.group(2) != self.workspace_id or not any(
                    m.version == ours.group(4) for m in self.workspace_models.get(ours.group(3), []))):
                return self.poller(name, error=ResourceNotFoundError(f"model {endpoint.model_id} not found"))
            uri = self.serverless_scoring_uri or f"https://{endpoint.name}.{self.location}.models.ai.azure.com"
            # what `get` shows while the service provisions it: no scoring URI until the operation has ended
            created = ServerlessEndpoint(name=endpoint.name, model_id=endpoint.model_id, auth_mode="key",
                                         location=endpoint.location or self.location,
                                         provisioning_state="Creating")
            self.serverless_endpoints[endpoint.name] = created

            def provisioned():
                created.provisioning_state, created.scoring_uri = "Succeeded", uri

            self.created.append(endpoint)
            return self.poller(name, result=created, on_done=provisioned)
        endpoint_name = args[0] if args else kwargs["name"]
        if endpoint_name not in self.serverless_endpoints:
            raise ResourceNotFoundError(f"serverless endpoint {endpoint_name} not found")
        if method == "get":
            return self.serverless_endpoints[endpoint_name]
        if method == "get_keys":
            return EndpointAuthKeys(primary_key=self.serverless_keys[0], secondary_key=self.serverless_keys[1])
        if method == "begin_delete":  # gone when the operation has ended; "Deleting" until then
            self.serverless_endpoints[endpoint_name].provisioning_state = "Deleting"
            return self.poller(name, on_done=lambda: self.serverless_endpoints.pop(endpoint_name, None))
        raise AssertionError(f"the test double has no answer for {name}")

    def log_evaluation(self, folder, values: Dict[str, float]) -> str:
        """The evaluate job's MLflow run in a file store under `folder` (the workspace's tracking URI from now on),
        holding `values` as the evaluator program logs them; its run id is the job's name."""
        import os

        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.tracking_uri = Path(folder).resolve().as_uri()
        client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = client.get_experiment_by_name("evaluate") or client.get_experiment(
            client.create_experiment("evaluate"))
        run = client.create_run(experiment.experiment_id)
        client.log_batch(run.info.run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in values.items()])
        self.evaluate_job_name = run.info.run_id
        return run.info.run_id

    def _registry_bodies(self) -> List[Dict[str, Any]]:
        foundation = model_from_rest(self.model_body).name
        others = [b for name, b in self.registry_bodies.items() if name != foundation]
        return [self.model_body] + others

    def _registry_body(self, name: str) -> Optional[Dict[str, Any]]:
        for body in self._registry_bodies():
            if body["id"].split("/models/")[1].split("/")[0] == name:
                return body
        return None

    # ---- reading the log ----------------------------------------------------------------------------------
    def names(self) -> List[str]:
        return [c.name for c in self.calls]

    def spending(self) -> List[str]:
        return [n for n in self.names() if n in SPENDING]

    def find(self, name: str) -> List[Call]:
        return [c for c in self.calls if c.name == name]
