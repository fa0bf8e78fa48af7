"""A call-recording stand-in for Azure: MLClient (workspace and registry), the credentials, and the answers.

`AzureWorld` holds what the service would answer (the registry's Phi-3 model with its real tags as strings, the
chat_completion_pipeline component loaded from the real spec, clusters, VM sizes, the job, the endpoint's reply)
and records every call as (name, args, kwargs) in `world.calls`. `world.clients()` is an AzureClients whose
MLClient and credential classes are these stand-ins, so the runner's real login/workspace logic runs in between.
"""

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import yaml

from runner.azureml.spec import DEFAULT_SPEC

# Everything the stand-in serves is the repository's own: the component contract the runner ships, and the registry
# model's facts recorded under tests/fixtures/azureml/.
PIPELINE_SPEC = DEFAULT_SPEC
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "azureml"
PHI3_SPEC = FIXTURES / "phi-3-mini-4k-instruct.model.yaml"

# The subset of calls that create, submit or delete something (cost money or change the workspace).
SPENDING = (
    "workspace.begin_create_or_update",
    "workspace.jobs.create_or_update",
    "workspace.models.create_or_update",
    "workspace.online_deployments.begin_create_or_update",
    "workspace.online_endpoints.begin_delete",
    "workspace.compute.begin_delete",
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


def registry_phi3_model(archived_stage: bool = False):
    """Phi-3-mini-4k-instruct as the registry returns it: tags are strings (Python literals), as the notebook
    parses them with ast.literal_eval; allow lists and deprecation dates also in the system metadata."""
    spec = yaml.safe_load(PHI3_SPEC.read_text())
    meta = spec["system_metadata"]
    tags = {
        "finetune_compute_allow_list": repr(meta["supportedComputes"]["finetuneComputes"]),
        "inference_compute_allow_list": repr(meta["supportedComputes"]["inferenceComputes"]),
        "model_specific_defaults": repr(spec["tags"]["model_specific_defaults"]),
    }
    return SimpleNamespace(
        id=f"azureml://registries/azureml/models/{spec['name']}/versions/{spec['version']}",
        name=spec["name"],
        version=str(spec["version"]),
        tags=tags,
        stage="Archived" if archived_stage else None,
        _system_metadata=meta,
    )


class Poller:
    def __init__(self, world: "AzureWorld", name: str, result: Any = None, error: Optional[Exception] = None):
        self.world, self.name, self._result, self.error = world, name, result, error

    def wait(self):
        self.world.calls.append(Call((f"{self.name}.wait", (), {})))
        if self.error:
            raise self.error

    def result(self):
        self.world.calls.append(Call((f"{self.name}.result", (), {})))
        if self.error:
            raise self.error
        return self._result


class Ops:
    """An operations group (client.compute, client.jobs, ...): every method call is recorded and answered."""

    def __init__(self, world: "AzureWorld", prefix: str):
        self._world, self._prefix = world, prefix

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        return lambda *args, **kwargs: self._world.answer(f"{self._prefix}.{method}", args, kwargs)


class AzureWorld:
    def __init__(self, *, job_name: str = "sincere_kettle_42", tracking_uri: str = "file:///nonexistent"):
        from azure.ai.ml import load_component

        self.calls: List[Call] = []
        self.model = registry_phi3_model()
        self.component = load_component(source=str(PIPELINE_SPEC))
        self.computes: Dict[str, Any] = {}
        self.sizes = [SimpleNamespace(name="Standard_ND96asr_v4", gpus=8),
                      SimpleNamespace(name="Standard_NC24ads_A100_v4", gpus=1),
                      SimpleNamespace(name="Standard_ND40rs_v2", gpus=8)]
        self.failing_tiers: set = set()
        self.job_name = job_name
        self.job_status = "Completed"
        self.tracking_uri = tracking_uri
        self.response: Any = '[{"0": "Hello from the endpoint"}]'
        self.token_error: Optional[Exception] = None
        self.created: List[Any] = []

    # ---- the classes handed to AzureClients ---------------------------------------------------------------
    def clients(self, **kwargs):
        from runner.azureml.clients import AzureClients

        world = self

        class FakeCredential:
            def __init__(self):
                world.calls.append(Call(("DefaultAzureCredential", (), {})))

            def get_token(self, *scopes):
                world.calls.append(Call(("DefaultAzureCredential.get_token", scopes, {})))
                if world.token_error:
                    raise world.token_error
                return SimpleNamespace(token="SECRET-TOKEN-VALUE", expires_on=0)

        class FakeInteractive:
            def __init__(self):
                world.calls.append(Call(("InteractiveBrowserCredential", (), {})))

        class FakeMLClient:
            def __init__(self, credential, subscription_id=None, resource_group_name=None, workspace_name=None,
                         registry_name=None):
                world.calls.append(Call(("MLClient", (type(credential).__name__,), dict(
                    subscription_id=subscription_id, resource_group_name=resource_group_name,
                    workspace_name=workspace_name, registry_name=registry_name))))
                self.workspace_name = workspace_name
                self.resource_group_name = resource_group_name
                prefix = "registry" if registry_name else "workspace"
                for group in ("models", "components", "compute", "jobs", "online_endpoints",
                              "online_deployments", "workspaces"):
                    setattr(self, group, Ops(world, f"{prefix}.{group}"))
                self._prefix = prefix

            @classmethod
            def from_config(cls, credential=None, path=None):
                world.calls.append(Call(("MLClient.from_config", (), {"path": path})))
                data = yaml.safe_load(Path(path).read_text())
                client = cls.__new__(cls)
                cls.__init__(client, credential, data["subscription_id"], data["resource_group"],
                             data["workspace_name"])
                return client

            def begin_create_or_update(self, entity):
                return world.answer(f"{self._prefix}.begin_create_or_update", (entity,), {})

        kwargs.setdefault("environ", {})
        return AzureClients(mlclient_cls=FakeMLClient, default_credential_cls=FakeCredential,
                            interactive_credential_cls=FakeInteractive, **kwargs)

    # ---- answers ------------------------------------------------------------------------------------------
    def answer(self, name: str, args: tuple, kwargs: dict) -> Any:
        from azure.core.exceptions import ResourceNotFoundError

        self.calls.append(Call((name, args, kwargs)))
        if name == "registry.models.get":
            return self.model
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
            entity = args[0]
            kind = type(entity).__name__
            if kind == "AmlCompute":
                if entity.tier in self.failing_tiers:
                    return Poller(self, name, error=RuntimeError(f"no quota for tier {entity.tier}"))
                self.computes[entity.name] = SimpleNamespace(name=entity.name, size=entity.size,
                                                             provisioning_state="Succeeded")
            self.created.append(entity)
            return Poller(self, name, result=SimpleNamespace(
                name=entity.name, scoring_uri=f"https://{entity.name}.eastus.inference.ml.azure.com/score"))
        if name == "workspace.jobs.create_or_update":
            return SimpleNamespace(name=self.job_name, status="Running",
                                   studio_url=f"https://ml.azure.com/runs/{self.job_name}")
        if name == "workspace.jobs.stream":
            return None
        if name == "workspace.jobs.get":
            return SimpleNamespace(name=args[0], status=self.job_status)
        if name == "workspace.workspaces.get":
            return SimpleNamespace(name=args[0] if args else None, mlflow_tracking_uri=self.tracking_uri)
        if name == "workspace.models.create_or_update":
            model = args[0]
            return SimpleNamespace(id=f"azureml:/subscriptions/sub/resourceGroups/rg/providers/"
                                      f"Microsoft.MachineLearningServices/workspaces/ws/models/{model.name}/versions/"
                                      f"{model.version}", name=model.name, version=model.version)
        if name == "workspace.online_deployments.begin_create_or_update":
            return Poller(self, name, result=args[0])
        if name == "workspace.online_endpoints.invoke":
            return self.response
        if name in ("workspace.online_endpoints.begin_delete", "workspace.compute.begin_delete"):
            return Poller(self, name)
        raise AssertionError(f"the test double has no answer for {name}")

    # ---- reading the log ----------------------------------------------------------------------------------
    def names(self) -> List[str]:
        return [c.name for c in self.calls]

    def spending(self) -> List[str]:
        return [n for n in self.names() if n in SPENDING]

    def find(self, name: str) -> List[Call]:
        return [c for c in self.calls if c.name == name]
