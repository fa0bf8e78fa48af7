"""How azure-ai-ml hands on a call, so that the dry run's recording clients and the tests' double refuse what the
real client would refuse.

`MLClient.begin_create_or_update(entity, **kwargs)` (and `create_or_update`) takes any keyword: the SDK dispatches
on the entity's type (a functools.singledispatch in azure/ai/ml/_ml_client.py) and passes the keywords to that
operations group's method, which raises TypeError on one it does not take. `dispatch()` runs that same dispatch
against autospecs of the real operations classes, so a keyword the real group would refuse fails here too.

Some keywords are accepted by the SDK and must still never come from the runner: `local=True` (and its debug
companions) deploys to local Docker instead of Azure. `refuse_local()` says so.
"""

import functools
import inspect
import typing
from typing import Any, Dict, Mapping, Tuple
from unittest import mock

# Keywords of the online endpoint/deployment operations that switch to the local Docker endpoint.
LOCAL_KEYWORDS = ("local", "vscode_debug", "local_enable_gpu")


class LocalDeploymentRequested(TypeError):
    """A keyword that would send the call to local Docker instead of Azure."""


@functools.lru_cache(maxsize=1)
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


# Operations whose signature ends in **kwargs, and the keywords azure-ai-ml 1.35.2 really reads on that path:
# - JobOperations.create_or_update(job, *, description, compute, tags, experiment_name, skip_validation, **kwargs):
#   its body replaces `kwargs` with the client's own (`kwargs = {**self._kwargs}`) before the REST call, so any other
#   keyword is silently dropped: a misspelt `experiment_nme=` would submit to the default experiment.
# - ServerlessEndpointOperations.begin_create_or_update / get / get_keys / begin_delete (endpoint or name, **kwargs):
#   the keywords go on to the service client's call and down azure-core's pipeline; what the pipeline's policies
#   and the LRO poller do not pop reaches the HTTP transport's session.request, a TypeError there.
AZURE_CORE_CALL_OPTIONS = frozenset({
    "headers", "user_agent", "logging_enable", "retry_total", "retry_connect", "retry_read", "retry_status",
    "retry_backoff_factor", "retry_backoff_max", "retry_mode", "timeout", "connection_timeout", "read_timeout",
    "polling", "polling_interval", "continuation_token"})
KWARGS_READ = {
    "jobs.create_or_update": frozenset(),  # the named keywords only: the signature checks those
    "serverless_endpoints.begin_create_or_update": AZURE_CORE_CALL_OPTIONS,
    "serverless_endpoints.begin_delete": AZURE_CORE_CALL_OPTIONS,
    "serverless_endpoints.get": AZURE_CORE_CALL_OPTIONS - {"polling", "polling_interval", "continuation_token"},
    "serverless_endpoints.get_keys": AZURE_CORE_CALL_OPTIONS - {"polling", "polling_interval", "continuation_token"},
}


def check_kwargs_read(call: str, method: Any, kwargs: Mapping[str, Any]) -> None:
    """For an operation in KWARGS_READ (`call` is "<group>.<method>", any prefix before it ignored): a keyword
    that is neither a named parameter of the SDK's `method` nor read on its path is a TypeError, as a wrong keyword of
    a method without **kwargs would be."""
    key = ".".join(call.split(".")[-2:])
    if key not in KWARGS_READ:
        return
    named = {name for name, p in inspect.signature(method).parameters.items()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(k for k in kwargs if k not in named and k not in KWARGS_READ[key])
    if unknown:
        raise TypeError(f"{call}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}: azure-ai-ml "
                        f"takes {', '.join(sorted(named - {'self'}))} there"
                        + (" and azure-core's per-call options" if KWARGS_READ[key] else
                           " (other keywords are dropped unread)"))
