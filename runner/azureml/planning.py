"""dry_run on azureml: the real steps, handed clients that record what would be sent instead of sending it.

`PlanningClients` stands where `AzureClients` stands in a real run. The Azure steps (runner/azureml/backend.py)
run unchanged: they log in, look up the model and the component, check, build the entities and call the same
MLClient methods. The workspace client here records each call (checked against the real azure-ai-ml method's
signature, so a call that would fail for real fails here too) and writes the object it was handed as azure-ai-ml
YAML, loadable with the SDK's own `load_*`:

    compute.yaml       AmlCompute                          MLClient.begin_create_or_update
    pipeline_job.yaml  the chat_completion_pipeline job    jobs.create_or_update
    model.yaml         the Model registered from its output models.create_or_update
    endpoint.yaml      ManagedOnlineEndpoint (with traffic) MLClient.begin_create_or_update
    deployment.yaml    ManagedOnlineDeployment             online_deployments.begin_create_or_update
    request.json       the scoring request                 online_endpoints.invoke
    evaluate_job.yaml  the evaluate command job (after the fine-tune job) jobs.create_or_update

finetune.route=finetuning_job / deployment.kind=serverless (runner/azureml/finetuning_job.py, serverless.py):

    finetuning_job.yaml       the `type: finetuning` job          jobs.create_or_update
    serverless_endpoint.yaml  ServerlessEndpoint                  serverless_endpoints.begin_create_or_update
    chat_request.json         the /v1/chat/completions body       POST {scoring_uri}/v1/chat/completions
    evaluate_base_endpoint.yaml, evaluate_ft_endpoint.yaml: the evaluate step's two serverless endpoints
    plan.yaml          every call in order, the steps' outputs, warnings
    <kind>.rest.json   beside each entity file but the pipeline job: the REST body the SDK sends for it
                       (runner/azureml/wire.py), its field types checked against the REST model's

So the plan is what a real run sends, by construction. What the planner answers in place of Azure: the foundation
model from the model preset (a real run reads the registry), the component from the recorded contract
(backend.component_spec), a cluster that does not exist yet, GPUs per node from the compute preset, and a job that
completes. No network, no credentials.
"""

import copy
import inspect
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from runner.atomic import write_text
from runner.azureml.entities import entity_yaml, plain

# The pipeline job's name is given by the service at submission; the plan refers to it by this placeholder.
JOB_NAME_PLACEHOLDER = "PIPELINE_JOB_NAME"
EVALUATE_JOB_PLACEHOLDER = "EVALUATE_JOB_NAME"
PLAN_FILES = ("compute", "pipeline_job", "model", "endpoint", "deployment", "finetuning_job", "serverless_endpoint",
              "evaluate_job", "evaluate_base_endpoint", "evaluate_ft_endpoint")
# What a plan assumes the service answers for the finetuning job's model and the workspace it lands in.
REGISTERED_VERSION = "1"  # the job registers a new model name: its first version
WORKSPACE_LOCATION, WORKSPACE_ID = "WORKSPACE_LOCATION", "WORKSPACE_ID"


# ---- serialisation: one function per kind, used for the plan files and by the tests for the real run's objects --


def component_reference(component: Any, cfg: Any) -> str:
    """What the submitted job points at: the registry component's own id, a pinned version, or the label."""
    asset_id = getattr(component, "id", None)
    if asset_id and str(asset_id).startswith("azureml://"):
        return str(asset_id)
    b = cfg.backend
    if b.component_version:
        return f"azureml://registries/{b.registry_name}/components/{b.component_name}/versions/{b.component_version}"
    return f"azureml://registries/{b.registry_name}/components/{b.component_name}/labels/{b.component_label}"


def pipeline_job_yaml(job: Any, *, component_ref: str, experiment_name: Optional[str]) -> Dict[str, Any]:
    from runner.azureml.translate import NODE_NAME

    data = plain(job._to_dict())
    node = data["jobs"][NODE_NAME]
    # The dump inlines the component, which load_job refuses; the job references the registry component.
    node["component"] = component_ref
    # The DSL dump writes local file inputs as `azureml:<path>` (an asset reference); they are local files that
    # the submission uploads, so they are written as the plain paths the job holds.
    for key, value in job.jobs[NODE_NAME].inputs.items():
        data_input = getattr(value, "_data", None)
        if getattr(data_input, "type", None) == "uri_file":
            node["inputs"][key] = {"type": "uri_file", "path": str(data_input.path)}
    ordered = {"$schema": "https://azuremlschemas.azureedge.net/latest/pipelineJob.schema.json",
               "experiment_name": experiment_name}
    ordered.update({k: v for k, v in data.items() if k not in ("$schema", "experiment_name")})
    return ordered


def write_yaml(path: Path, data: Dict[str, Any]) -> Path:
    import yaml

    return write_text(path, yaml.safe_dump(plain(data), sort_keys=False, default_flow_style=False))


def load_component_file(path: Path):
    """azure.ai.ml's component entity from a spec file (an exported spec is trimmed to the component keys)."""
    import yaml
    from azure.ai.ml import load_component

    from runner.azureml.spec import load_spec

    spec = load_spec(str(path))
    if set(spec.raw) <= set(spec.component_dict()):
        return load_component(source=str(path))
    with tempfile.TemporaryDirectory() as tmp:
        trimmed = Path(tmp) / "component.yaml"
        trimmed.write_text(yaml.safe_dump(spec.component_dict(), sort_keys=False), encoding="utf-8")
        return load_component(source=str(trimmed))


# ---- the recorder ---------------------------------------------------------------------------------------------


class PlanRecorder:
    def __init__(self, cfg: Any, plan_dir: Path):
        self.cfg = cfg
        self.plan_dir = Path(plan_dir)
        self.calls: List[Dict[str, Any]] = []
        self.files: Dict[str, str] = {}

    def call(self, name: str, real_method: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Dict[str, Any]:
        """Record a call, bound to the real SDK method's signature (a wrong name or argument fails here as it would
        for real); returns the bound arguments by parameter name."""
        kwargs = kwargs or {}
        bound = inspect.signature(real_method).bind(None, *args, **kwargs).arguments
        from runner.azureml.sdk_calls import check_kwargs_read, refuse_local

        refuse_local(name, kwargs)  # accepted by the SDK, but it deploys to local Docker
        check_kwargs_read(name, real_method, kwargs)  # taken by **kwargs, but never read (or a TypeError later)
        entry: Dict[str, Any] = {"call": name}
        shown = {k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, bool))}
        if shown:
            entry["kwargs"] = shown
        self.calls.append(entry)
        return bound

    def write(self, kind: str, data: Dict[str, Any], entity: Any = None) -> str:
        """The object the last recorded call was handed, as plan/<kind>.yaml; with `entity`, also the REST body the
        SDK would send for it, as plan/<kind>.rest.json (its types checked: runner/azureml/wire.py)."""
        if entity is not None:
            from runner.azureml.wire import wire_body

            rest = self.plan_dir / f"{kind}.rest.json"
            rest.parent.mkdir(parents=True, exist_ok=True)
            write_text(rest, json.dumps(wire_body(entity), indent=2, sort_keys=True) + "\n")
            self.files[f"{kind}.rest"] = self.calls[-1]["rest_file"] = str(rest)
        path = write_yaml(self.plan_dir / f"{kind}.yaml", data)
        self.files[kind] = self.calls[-1]["file"] = str(path)
        return str(path)



class _Poller:
    """What an LROPoller offers the steps (wait, result, done, status), behaving as the service's: InProgress for
    the first IN_PROGRESS_POLLS looks, done once waited for. A step that does not wait sees InProgress, as it would
    for real."""

    IN_PROGRESS_POLLS = 3

    def __init__(self, result: Any = None, what: str = ""):
        self._result, self.what = result, what
        self._looks, self._finished = 0, False

    def _look(self) -> str:
        self._looks += 1
        if self._looks > self.IN_PROGRESS_POLLS:
            self._finished = True
        return "Succeeded" if self._finished else "InProgress"

    def wait(self, timeout: Optional[float] = None) -> None:
        self._finished = True

    def result(self, timeout: Optional[float] = None) -> Any:
        self._finished = True
        return self._result

    def done(self) -> bool:
        return self._look() != "InProgress"

    def status(self) -> str:
        return self._look()


class _Ops:
    """An operations group whose methods record; `real` is the azure-ai-ml class it stands for."""

    real: Any = None
    prefix = ""

    def __init__(self, recorder: PlanRecorder, world: "PlanningWorld"):
        self.recorder, self.world = recorder, world

    def _record(self, method: str, args: tuple, kwargs: dict) -> Dict[str, Any]:
        return self.recorder.call(f"{self.prefix}.{method}", getattr(self.real, method), args, kwargs)

    def __getattr__(self, method: str):
        """Every other method of the SDK's class exists here too, checked against its real signature (a wrong
        argument is the TypeError it would be); one the planner has no answer for says so rather than pretending.
        A name the SDK's class does not have is an AttributeError, as on the real client."""
        if method.startswith("_") or not callable(getattr(self.real, method, None)):
            raise AttributeError(f"{type(self.real).__name__ if self.real else 'operations'} has no attribute "
                                 f"{method!r} ({getattr(self.real, '__name__', '?')} does not)")

        def unplanned(*args, **kwargs):
            self._record(method, args, kwargs)
            raise NotImplementedError(f"dry run: {self.prefix}.{method} is a real azure-ai-ml call the planner has no "
                                      f"answer for (runner/azureml/planning.py)")
        return unplanned


def _operations():
    from azure.ai.ml.operations import (
        ComponentOperations,
        ComputeOperations,
        JobOperations,
        ModelOperations,
        OnlineDeploymentOperations,
        OnlineEndpointOperations,
        ServerlessEndpointOperations,
        WorkspaceOperations,
    )

    return {"components": ComponentOperations, "compute": ComputeOperations, "jobs": JobOperations,
            "models": ModelOperations, "online_deployments": OnlineDeploymentOperations,
            "online_endpoints": OnlineEndpointOperations, "workspaces": WorkspaceOperations,
            "serverless_endpoints": ServerlessEndpointOperations}


class PlanningWorld:
    """The answers a dry run gives in place of Azure, and the objects it has been handed so far."""

    def __init__(self, cfg: Any, recorder: PlanRecorder, component_spec_path: Path):
        self.cfg, self.recorder = cfg, recorder
        self.component_spec_path = component_spec_path
        self.computes: Dict[str, Any] = {}
        self.warnings: List[str] = []
        self.jobs: Dict[str, Any] = {}  # submitted jobs by the name the plan gives them
        self.serverless_endpoints: Dict[str, Any] = {}

    # the registry's answers
    def foundation_model(self, name: str, version: Optional[str], label: Optional[str]):
        """The model preset as a registry Model entity: its defaults as the registry's string tag. The allow lists
        are left to the preset (the model step says that is where they came from)."""
        from azure.ai.ml.entities import Model
        from omegaconf import OmegaConf

        from runner.azureml.tags import preset_facts_apply

        m = self.cfg.model
        if not preset_facts_apply(m, name):  # the preset's facts are another model's: the plan knows nothing of it
            self.warnings.append(
                f"model {name}: the model preset holds the registry facts of {m.facts_for}, not of {name}; the plan "
                f"uses none of them (no allow lists, defaults or archived status; a real run reads the registry)"
                + ("" if version else f", and cannot resolve label {label!r} to a version offline"))
            return Model(name=name, version=version)
        if not version and label == "latest" and m.latest_version:
            # What models.get(name, label="latest") answers: the version the label resolves to, never the label.
            version = str(m.latest_version)
            if m.get("latest_version_stand_in"):
                self.warnings.append(
                    f"model {name}: label 'latest' planned as version {version}, the model preset's latest_version (a "
                    f"stand-in from public data, not read from the registry); a real run resolves the label itself, "
                    f"and may get another version")
        elif not version:
            self.warnings.append(f"model {name}: label {label!r} has no version in the model preset "
                                 f"(model.latest_version); the plan refers to the label, a real run to the version "
                                 f"the registry resolves it to")
        defaults = OmegaConf.to_container(m.model_specific_defaults, resolve=True)
        model = Model(name=name, version=version, tags={"model_specific_defaults": repr(defaults)},
                      stage="Archived" if m.archived else None)
        return model

    def component(self, name: str, version: Optional[str], label: Optional[str]):
        """The recorded contract as the registry's component entity; an exported spec keeps its registry id."""
        from runner.azureml.spec import load_spec

        component = load_component_file(self.component_spec_path)
        asset_id = load_spec(str(self.component_spec_path)).asset_id
        if asset_id:
            component._id = str(asset_id)  # what a registry's entity carries (the entity has no setter)
        return component

    def registered_model(self, name: str, version: Optional[str]):
        """The model a finetuning job registers through its output: a new name, so its first version."""
        from azure.ai.ml.entities import Model

        version = str(version or REGISTERED_VERSION)
        return Model(name=name, version=version, type="mlflow_model", id=f"azureml:{name}:{version}",
                     path=f"azureml://jobs/{JOB_NAME_PLACEHOLDER}/outputs/registered_model")

    def serverless_endpoint(self, name: str):
        """A planned endpoint as the service describes it: its scoring URI is the service's to give."""
        from azure.ai.ml.entities import ServerlessEndpoint

        planned = self.serverless_endpoints.get(name)
        uri = f"https://{name}.{WORKSPACE_LOCATION}.models.ai.azure.com"
        return ServerlessEndpoint(name=name, model_id=getattr(planned, "model_id", None) or "(planned)",
                                  auth_mode="key", scoring_uri=uri)

    def vm_sizes(self):
        from azure.ai.ml.entities import VmSize

        c = self.cfg.compute
        gpus = int(c.gpus_per_node or 0)
        if not gpus:
            self.warnings.append(f"compute.gpus_per_node=0: a real run takes it from compute.list_sizes() for "
                                 f"{c.size}; this plan assumes 1")
            gpus = 1
        return [VmSize(name=c.size, gpus=gpus)]


def _make_ops(world: PlanningWorld):
    """The operations groups of the planning MLClients, each method mirroring the real one's signature."""
    ops = _operations()
    return {**_asset_ops(world, ops), **_job_ops(world, ops), **_endpoint_ops(world, ops)}


def _asset_ops(world: PlanningWorld, ops):
    """models, components, compute: answered from the presets and the recorded contract; a new model written."""
    from azure.core.exceptions import ResourceNotFoundError

    rec = world.recorder

    class Models(_Ops):
        real, prefix = ops["models"], "models"

        def get(self, *args, **kwargs):
            bound = self._record("get", args, kwargs)
            if self.prefix.startswith("workspace"):  # the model a finetuning job registered
                return world.registered_model(bound["name"], bound.get("version"))
            return world.foundation_model(bound["name"], bound.get("version"), bound.get("label"))

        def create_or_update(self, *args, **kwargs):
            model = self._record("create_or_update", args, kwargs)["model"]
            rec.write("model", entity_yaml(model), model)
            registered = copy.copy(model)
            registered._id = f"azureml:{model.name}:{model.version}"  # what a deployment may reference
            return registered

        def download(self, *args, **kwargs):  # recorded, not made: the export step's plan names it
            self._record("download", args, kwargs)

    class Components(_Ops):
        real, prefix = ops["components"], "components"

        def get(self, *args, **kwargs):
            bound = self._record("get", args, kwargs)
            return world.component(bound["name"], bound.get("version"), bound.get("label"))

    class Compute(_Ops):
        real, prefix = ops["compute"], "compute"

        def get(self, *args, **kwargs):
            name = self._record("get", args, kwargs)["name"]
            if name not in world.computes:
                raise ResourceNotFoundError(f"(dry run) compute {name} is planned as new")
            return world.computes[name]

        def list_sizes(self, *args, **kwargs):
            self._record("list_sizes", args, kwargs)
            return world.vm_sizes()

        def begin_delete(self, *args, **kwargs):
            self._record("begin_delete", args, kwargs)
            return _Poller()

    return {"models": Models, "components": Components, "compute": Compute}


def _job_ops(world: PlanningWorld, ops):
    """jobs: the pipeline or finetuning job written as YAML; a submitted job completes."""
    rec, cfg = world.recorder, world.cfg

    class Jobs(_Ops):
        real, prefix = ops["jobs"], "jobs"

        def create_or_update(self, *args, **kwargs):
            from runner.azureml.translate import NODE_NAME

            bound = self._record("create_or_update", args, kwargs)
            job = bound["job"]
            if getattr(job, "type", None) == "finetuning":
                from runner.azureml.finetuning_job import finetuning_job_yaml

                rec.write("finetuning_job", finetuning_job_yaml(job), job)
                submitted = copy.copy(job)
                submitted.name = JOB_NAME_PLACEHOLDER
                world.jobs[JOB_NAME_PLACEHOLDER] = submitted
                return submitted
            if getattr(job, "type", None) == "command":  # the evaluate step's job
                from runner.azureml.evaluate_job import evaluate_job_yaml

                rec.write("evaluate_job", evaluate_job_yaml(job))
                submitted = copy.copy(job)
                submitted.name = EVALUATE_JOB_PLACEHOLDER
                return submitted
            rec.write("pipeline_job", pipeline_job_yaml(
                job, component_ref=component_reference(job.jobs[NODE_NAME].component, cfg),
                experiment_name=bound.get("experiment_name") or job.experiment_name))
            submitted = copy.copy(job)
            submitted.name = JOB_NAME_PLACEHOLDER
            return submitted

        def stream(self, *args, **kwargs):
            self._record("stream", args, kwargs)

        def get(self, *args, **kwargs):
            self._record("get", args, kwargs)
            from types import SimpleNamespace

            submitted = world.jobs.get(JOB_NAME_PLACEHOLDER)
            return SimpleNamespace(name=JOB_NAME_PLACEHOLDER, status="Completed",  # a plan assumes success
                                   outputs=dict(getattr(submitted, "outputs", None) or {}))

    return {"jobs": Jobs}


def _endpoint_ops(world: PlanningWorld, ops):
    """online deployments and endpoints, the workspace, serverless endpoints: written, answered, deleted."""
    rec = world.recorder

    class OnlineDeployments(_Ops):
        real, prefix = ops["online_deployments"], "online_deployments"

        def begin_create_or_update(self, *args, **kwargs):
            deployment = self._record("begin_create_or_update", args, kwargs)["deployment"]
            rec.write("deployment", entity_yaml(deployment), deployment)
            return _Poller(deployment)

    class OnlineEndpoints(_Ops):
        real, prefix = ops["online_endpoints"], "online_endpoints"

        def invoke(self, *args, **kwargs):
            request = Path(self._record("invoke", args, kwargs).get("request_file") or "")
            target = rec.plan_dir / "request.json"
            if request.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(request, target)
                rec.files["request"] = str(target)
            rec.calls[-1]["file"] = str(target)
            return json.dumps({"output": "(dry run: the endpoint's reply comes here)"})

        def begin_delete(self, *args, **kwargs):
            self._record("begin_delete", args, kwargs)
            return _Poller()

    class Workspaces(_Ops):
        real, prefix = ops["workspaces"], "workspaces"

        def get(self, *args, **kwargs):
            from azure.ai.ml.entities import Workspace

            bound = self._record("get", args, kwargs)
            return Workspace(name=bound.get("name") or "workspace", location=WORKSPACE_LOCATION,
                             workspace_id=WORKSPACE_ID)

    class ServerlessEndpoints(_Ops):
        real, prefix = ops["serverless_endpoints"], "serverless_endpoints"

        def begin_create_or_update(self, *args, **kwargs):
            from runner.azureml.serverless import serverless_endpoint_yaml

            from runner.azureml.serverless_evaluate import plan_kind

            endpoint = self._record("begin_create_or_update", args, kwargs)["endpoint"]
            rec.write(plan_kind(endpoint.name), serverless_endpoint_yaml(endpoint), endpoint)
            world.serverless_endpoints[endpoint.name] = endpoint
            return _Poller(world.serverless_endpoint(endpoint.name))

        def get(self, *args, **kwargs):
            return world.serverless_endpoint(self._record("get", args, kwargs)["name"])

        def get_keys(self, *args, **kwargs):
            from azure.ai.ml.entities import EndpointAuthKeys

            self._record("get_keys", args, kwargs)
            return EndpointAuthKeys(primary_key="(dry run: no key)", secondary_key="(dry run: no key)")

        def begin_delete(self, *args, **kwargs):
            self._record("begin_delete", args, kwargs)
            return _Poller()

    return {"online_deployments": OnlineDeployments, "online_endpoints": OnlineEndpoints, "workspaces": Workspaces,
            "serverless_endpoints": ServerlessEndpoints}


class PlanningMLClient:
    """Stands for azure.ai.ml.MLClient (a workspace or a registry) in a dry run."""

    def __init__(self, world: PlanningWorld, *, prefix: str, workspace_name: Optional[str] = None,
                 resource_group_name: Optional[str] = None):
        self._world = world
        self.workspace_name, self.resource_group_name = workspace_name, resource_group_name
        for name, cls in _make_ops(world).items():
            ops = cls(world.recorder, world)
            ops.prefix = f"{prefix}.{name}"
            setattr(self, name, ops)

    def begin_create_or_update(self, *args, **kwargs):
        from azure.ai.ml import MLClient
        from azure.ai.ml.entities import AmlCompute, OnlineEndpoint

        recorder = self._world.recorder
        entity = recorder.call("workspace.begin_create_or_update", MLClient.begin_create_or_update, args,
                               kwargs)["entity"]
        from runner.azureml.sdk_calls import dispatch

        # MLClient takes any keyword and hands it to the operations group of the entity's type, which may not
        dispatch("begin_create_or_update", entity, {k: v for k, v in kwargs.items() if k != "entity"})
        if isinstance(entity, AmlCompute):
            recorder.write("compute", entity_yaml(entity), entity)
            self._world.computes[entity.name] = entity
        elif isinstance(entity, OnlineEndpoint):
            recorder.write("endpoint", entity_yaml(entity), entity)  # the last call (with traffic) stays
            # what the service answers when it has created it: the endpoint with its scoring URI
            entity = copy.copy(entity)
            entity._scoring_uri = f"https://{entity.name}.{WORKSPACE_LOCATION}.inference.ml.azure.com/score"  # read-only
        else:
            raise TypeError(f"dry run: begin_create_or_update of an unexpected {type(entity).__name__}")
        return _Poller(entity)


class DryRunCredential:
    """No credential: a dry run never asks for a token."""


class PlanningClients:
    """AzureClients for a dry run: the same three methods, answered by the planning world."""

    def __init__(self, world: PlanningWorld):
        self.world = world

    def credential(self, backend_cfg: Any) -> Any:
        return DryRunCredential()

    def workspace(self, credential: Any, backend_cfg: Any) -> Any:
        b = backend_cfg
        return PlanningMLClient(self.world, prefix="workspace",
                                workspace_name=b.workspace_name or f"(from {b.config_path})",
                                resource_group_name=b.resource_group)

    def registry(self, credential: Any, registry_name: str) -> Any:
        return PlanningMLClient(self.world, prefix="registry")

    def post_json(self, url: str, body: Any, headers: Any, timeout: float) -> Any:
        """The endpoint call a real run makes (a serverless endpoint's /v1/chat/completions): the body is written to
        plan/chat_request.json, the key is not."""
        rec = self.world.recorder
        rec.calls.append({"call": f"POST {url}", "headers": sorted(headers)})
        target = rec.plan_dir / "chat_request.json"
        write_text(target, json.dumps(body, indent=2) + "\n")
        rec.files["chat_request"] = rec.calls[-1]["file"] = str(target)
        reply = "(dry run: the endpoint's reply comes here)"
        return {"choices": [{"message": {"role": "assistant", "content": reply}}]}


def planning_clients(cfg: Any, plan_dir: Path, component_spec_path: Path) -> PlanningClients:
    recorder = PlanRecorder(cfg, plan_dir)
    return PlanningClients(PlanningWorld(cfg, recorder, component_spec_path))
