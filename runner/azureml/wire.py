"""What a real run puts on the wire: an entity's REST body, serialized as azure-ai-ml 1.35.2 sends it, and its types
checked against the REST model's own field types.

The SDK's operations turn an entity into its REST model (`entity._to_rest_object()`) and the service client sends
`json.dumps(body, cls=SdkJSONEncoder, exclude_readonly=True)` (azure/ai/ml/_restclient/arm_ml_service/operations).
That body is what the service reads, so a plan compares it with the run's as well as the YAML: a value that dumps one
way and goes on the wire another (a task type, a string where the service wants an int) shows.

The REST models do not check types: `ManagedOnlineDeployment(instance_count="1")` goes out as `"capacity": "1"`,
which the service refuses with a 400 after the endpoint was already created. `check_wire_types` refuses it first.
"""

import enum
import inspect
import json
import typing
from typing import Any, Dict, List

from runner.errors import RunnerError


class WireTypeError(RunnerError, TypeError):
    """A field of a REST body whose value is not of the type the REST model declares (a runner bug)."""


def rest_object(entity: Any) -> Any:
    """The REST model the SDK's operations build from `entity` (deployments need a location: the SDK passes the
    endpoint's; it is not checked here)."""
    from azure.ai.ml.entities import OnlineDeployment, OnlineEndpoint

    if isinstance(entity, OnlineDeployment):
        return entity._to_rest_object(location="(workspace location)")
    if isinstance(entity, OnlineEndpoint):
        return entity._to_rest_online_endpoint("(workspace location)")
    return entity._to_rest_object()


def wire_body(entity: Any) -> Dict[str, Any]:
    """The JSON body the SDK sends for `entity`, as a dict (after the type check)."""
    from azure.ai.ml._restclient.arm_ml_service._utils.model_base import SdkJSONEncoder

    rest = rest_object(entity)
    check_wire_types(rest, type(entity).__name__)
    return json.loads(json.dumps(rest, cls=SdkJSONEncoder, exclude_readonly=True))


def _hints(cls: type) -> Dict[str, Any]:
    from azure.ai.ml._restclient.arm_ml_service import models as _models

    module = inspect.getmodule(cls)
    namespace = {**vars(module), "_models": _models} if module else {"_models": _models}
    try:
        return typing.get_type_hints(cls, globalns=namespace)
    except Exception:  # a hint this Python cannot evaluate: that field is not checked
        return {}


def _problems(value: Any, hint: Any, where: str) -> List[str]:
    from azure.ai.ml._restclient.arm_ml_service._utils.model_base import Model

    if value is None or hint is Any:
        return []
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        options = [a for a in args if a is not type(None)]
        found = [_problems(value, a, where) for a in options]
        return [] if any(not f for f in found) else found[0]
    if origin is typing.Literal:
        return [] if value in args else [f"{where}={value!r} is not one of {list(args)}"]
    if origin in (list, List):
        if not isinstance(value, list):
            return [f"{where}={value!r} is a {type(value).__name__}, the REST model wants a list"]
        return [p for i, v in enumerate(value) for p in _problems(v, args[0] if args else Any, f"{where}[{i}]")]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            return [f"{where}={value!r} is a {type(value).__name__}, the REST model wants an object"]
        return [p for k, v in value.items() for p in _problems(v, args[1] if len(args) > 1 else Any, f"{where}.{k}")]
    if not isinstance(hint, type):
        return []
    if issubclass(hint, Model):
        if not isinstance(value, Model):
            return [f"{where}={value!r} is a {type(value).__name__}, the REST model wants {hint.__name__}"]
        return _model_problems(value, where)
    if issubclass(hint, enum.Enum):
        return [] if isinstance(value, (str, enum.Enum)) else [
            f"{where}={value!r} is a {type(value).__name__}, the REST model wants a {hint.__name__} string"]
    wanted = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}.get(hint)
    if wanted is None:
        return []
    if not isinstance(value, wanted) or (hint is not bool and isinstance(value, bool)):
        return [f"{where}={value!r} is a {type(value).__name__}, the REST model wants {hint.__name__}"]
    return []


def _model_problems(obj: Any, where: str) -> List[str]:
    hints = _hints(type(obj))
    problems = []
    for attr, field in type(obj)._attr_to_rest_field.items():
        value = obj.get(field._rest_name)
        if attr in hints:
            problems += _problems(value, hints[attr], f"{where}.{field._rest_name}")
    return problems


def check_wire_types(rest: Any, what: str) -> None:
    """Every field of the REST model `rest` holds the type its model declares; WireTypeError names each that does
    not."""
    problems = _model_problems(rest, what)
    if problems:
        raise WireTypeError(f"the REST body of {what} would not be what the service reads: " + "; ".join(problems))
