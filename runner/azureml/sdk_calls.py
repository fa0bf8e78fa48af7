"""How azure-ai-ml hands on a call, so that the dry run's recording clients and the tests' double refuse what the
real client would refuse.

`MLClient.begin_create_or_update(entity, **kwargs)` (and `create_or_update`) takes any keyword: the SDK dispatches
on the entity's type (a functools.singledispatch in azure/ai/ml/_ml_client.py) and passes the keywords to that
operations group's method, which raises TypeError on one it does not take. `dispatch()` runs that same dispatch
against autospecs of the real operations classes, so a keyword the real group would refuse fails here too.

Some keywords are accepted by the SDK and must still never come from the runner: `local=True` (and its debug
companions) deploys to local Docker instead of Azure. `refuse_local()` says so.
"""

import inspect
import typing
from typing import Any, Dict, Mapping, Tuple
from unittest import mock

# Keywords of the online endpoint/deployment operations that switch to the local Docker endpoint.
LOCAL_KEYWORDS = ("local", "vscode_debug", "local_enable_gpu")


class LocalDeploymentRequested(TypeError):
    """A keyword that would send the call to local Docker instead of Azure."""


def operation_groups() -> Dict[str, type]:
    """MLClient's operations groups (property name → operations class), from the SDK's own type hints."""
    from azure.ai.ml import MLClient

    groups = {}
    for name, member in inspect.getmembers(MLClient):
        if isinstance(member, property) and not name.startswith("_"):
            ret = typing.get_type_hints(member.fget).get("return")
            if inspect.isclass(ret) and ret.__name__.endswith("Operations"):
                groups[name] = ret
    return groups


class _Groups(dict):
    """What MLClient hands its dispatch (`_operation_container.all_operations`, keyed by AzureMLResourceType):
    autospecs of the real operations classes, made when asked for and remembered by group name."""

    def __init__(self):
        super().__init__()
        self._classes = operation_groups()
        self.used: Dict[str, Any] = {}

    def __missing__(self, resource_type: str) -> Any:
        # AzureMLResourceType values are the group names, some in the plural ("computes" → compute)
        for group in (resource_type, resource_type[:-1] if resource_type.endswith("s") else resource_type):
            if group in self._classes:
                ops = mock.create_autospec(self._classes[group], instance=True)
                self[resource_type] = self.used[group] = ops
                return ops
        raise KeyError(f"azure-ai-ml has no operations group for {resource_type!r}")


def dispatch(method: str, entity: Any, kwargs: Mapping[str, Any]) -> Tuple[str, str, Dict[str, Any]]:
    """Run MLClient.<method>(entity, **kwargs)'s own dispatch against autospecs of the operations classes.

    Returns (group, method, kwargs) of the operations call the SDK would make; raises TypeError where the real group
    would (an unknown keyword), and LocalDeploymentRequested for a local Docker deployment."""
    from azure.ai.ml import _ml_client

    dispatcher = {"begin_create_or_update": _ml_client._begin_create_or_update,
                  "create_or_update": _ml_client._create_or_update}[method]
    groups = _Groups()
    dispatcher(entity, groups, **dict(kwargs))  # TypeError here is the SDK's own, from the autospec's signature
    for group, ops in groups.used.items():
        for call in ops.method_calls:
            name, _args, call_kwargs = call
            refuse_local(f"{group}.{name}", call_kwargs)
            return group, name, dict(call_kwargs)
    raise TypeError(f"MLClient.{method}: azure-ai-ml does not dispatch a {type(entity).__name__}")


def refuse_local(call: str, kwargs: Mapping[str, Any]) -> None:
    """The runner deploys to Azure only: a true `local`/`vscode_debug`/`local_enable_gpu` is a bug in the runner."""
    asked = [k for k in LOCAL_KEYWORDS if kwargs.get(k)]
    if asked:
        raise LocalDeploymentRequested(
            f"{call} was called with {', '.join(f'{k}={kwargs[k]!r}' for k in asked)}: that deploys to local "
            f"Docker, not to Azure ML; the runner never asks for it")
