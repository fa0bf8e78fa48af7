"""The component's input contract, read from its spec (no azure imports), and the runner's params coerced to it.

`chat_completion_pipeline` declares every flag as a string enum ("true"/"false"), `precision` and `deepspeed_stage`
as string enums ("32"/"16", "2"/"3"), and rejects any keyword it does not declare. The runner's config is typed
the Python way (bools, ints), and the model's tags mix both; this module turns the effective params into exactly
what the component accepts, drops what it does not declare, and refuses a key the user set explicitly that the
component does not have (naming the nearest input), before anything is created or submitted.

By default the spec is the project's own recorded contract of chat_completion_pipeline 0.0.82
(runner/azureml/components/, written by scripts/record_component.py). `backend.component_spec=` may name the spec
YAML from azureml-assets, one exported from a registry (`az ml component show ... -o json` / yaml: the same `inputs` at the top level,
plus `id`, `creation_context`, ...), or from a component entity's `_to_dict()`.
"""

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from runner.schema import ConfigError

# Input types whose value is a data/model asset (an azure.ai.ml Input), not a literal.
ASSET_TYPES = {"uri_file", "uri_folder", "mltable", "mlflow_model", "custom_model", "triton_model"}
# Top-level keys of a pipeline component spec; an exported spec carries more (id, creation_context, ...).
SPEC_KEYS = ("$schema", "name", "version", "display_name", "description", "type", "tags", "is_deterministic",
             "inputs", "outputs", "jobs")


@dataclass
class InputSpec:
    name: str
    type: str
    optional: bool = True
    default: Any = None
    enum: Optional[List[str]] = None
    min: Optional[float] = None
    max: Optional[float] = None


@dataclass
class ComponentSpec:
    name: str
    version: Optional[str]
    inputs: Dict[str, InputSpec]
    source: str  # where the spec came from, for messages
    asset_id: Optional[str] = None  # an exported spec's `id` (azureml://registries/.../versions/N)
    raw: Dict[str, Any] = field(default_factory=dict, repr=False)

    def component_dict(self) -> Dict[str, Any]:
        """The spec restricted to the keys a component YAML may hold (what load_component accepts)."""
        return {k: self.raw[k] for k in SPEC_KEYS if k in self.raw}


def _number(value: Any) -> Optional[float]:
    if value is None:
        return None
    return float(value)


def spec_from_dict(data: Mapping[str, Any], source: str) -> ComponentSpec:
    if "inputs" not in data:
        # the REST shape of a component version: {"properties": {"componentSpec": {...}}}
        props = data.get("properties") or {}
        inner = props.get("componentSpec") or props.get("component_spec")
        if isinstance(inner, Mapping):
            return spec_from_dict({**inner, "id": data.get("id")}, source)
        raise ConfigError(f"{source}: not a component spec (no `inputs` mapping at the top level)")
    inputs = {}
    for name, decl in (data.get("inputs") or {}).items():
        decl = decl or {}
        enum = decl.get("enum")
        optional = decl.get("optional", False)
        inputs[name] = InputSpec(
            name=name,
            type=str(decl.get("type", "string")),
            optional=optional if isinstance(optional, bool) else str(optional).lower() == "true",
            default=decl.get("default"),
            enum=[str(e) for e in enum] if enum is not None else None,
            min=_number(decl.get("min")),
            max=_number(decl.get("max")),
        )
    version = data.get("version")
    return ComponentSpec(
        name=str(data.get("name", "?")),
        version=str(version) if version is not None else None,
        inputs=inputs,
        source=source,
        asset_id=data.get("id"),
        raw=dict(data),
    )


def load_spec(path: str) -> ComponentSpec:
    """A component spec from a YAML or JSON file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"backend.component_spec={path!r}: no such file (relative paths are tried from the current directory "
            f"and the repository root). Point it at chat_completion_pipeline.spec.yaml from azureml-assets or a "
            f"spec exported with `az ml component show --registry-name azureml -n chat_completion_pipeline`"
        )
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))  # JSON is YAML too
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML/JSON: {exc}") from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return spec_from_dict(data, str(p))


# The contract shipped with the runner: what dry runs and the pre-submission checks use unless told otherwise.
COMPONENTS_DIR = Path(__file__).resolve().parent / "components"
DEFAULT_SPEC = COMPONENTS_DIR / "chat_completion_pipeline-0.0.82.yaml"


def resolve_spec_path(path: Optional[str], repo_root: Path) -> Path:
    """backend.component_spec: unset = the recorded contract shipped with the runner; otherwise as given if it
    exists from the current directory, else relative to the repo root."""
    if not path:
        return DEFAULT_SPEC
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return (repo_root / p).resolve()


# ---- coercion ---------------------------------------------------------------------------------------------


def _flag(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip().lower()
    if text in ("true", "false"):
        return text
    if text in ("1", "0"):
        return "true" if text == "1" else "false"
    raise ConfigError(f"finetune.{key}={value!r}: the component wants a flag, 'true' or 'false'")


def _enum_text(value: Any) -> str:
    """16 -> "16", 2.0 -> "2", "cosine" -> "cosine" (the component's enums are strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()



def _numeric(key: str, value: Any, wanted: str) -> float:
    """The value as a float, or ConfigError naming the key and what the component wants (a flag is no number)."""
    if isinstance(value, bool):
        raise ConfigError(f"finetune.{key}={value!r}: the component wants {wanted}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"finetune.{key}={value!r}: the component wants {wanted}") from None

def coerce_input(key: str, value: Any, spec: InputSpec) -> Any:
    """`value` in the type the component declares for `key`; ConfigError naming the key when it cannot be."""
    t = spec.type.lower()
    if spec.enum is not None:
        if set(spec.enum) == {"true", "false"}:
            text = _flag(key, value)
        else:
            text = _enum_text(value)
        if text not in spec.enum:
            raise ConfigError(
                f"finetune.{key}={value!r} is not accepted by the component: allowed values {spec.enum}"
            )
        return text
    if t == "boolean":
        return _flag(key, value) == "true"
    if t == "integer":
        number = _numeric(key, value, "an integer")
        if not number.is_integer():
            raise ConfigError(f"finetune.{key}={value!r}: the component wants an integer")
        out: Any = int(number)
    elif t == "number":
        out = _numeric(key, value, "a number")
        if math.isnan(out):
            raise ConfigError(f"finetune.{key}=nan: the component wants a number")
    elif t == "string":
        return _enum_text(value) if not isinstance(value, str) else value
    else:
        return value  # asset inputs are turned into Input objects by the translator
    if spec.min is not None and out < spec.min:
        raise ConfigError(f"finetune.{key}={value!r} is below the component's minimum {spec.min:g}")
    if spec.max is not None and out > spec.max:
        raise ConfigError(f"finetune.{key}={value!r} is above the component's maximum {spec.max:g}")
    return out


def nearest_input(key: str, spec: ComponentSpec) -> str:
    close = difflib.get_close_matches(key, list(spec.inputs), n=1, cutoff=0.5)
    if close:
        return f"did you mean {close[0]!r}?"
    return "its inputs are: " + ", ".join(sorted(spec.inputs))


def check_explicit_keys(explicit_keys: Iterable[str], spec: ComponentSpec) -> None:
    """A finetune key the user set on the command line must be an input of the component."""
    from runner.schema import RUNNER_FINETUNE_KEYS

    unknown = sorted(k for k in explicit_keys if k not in spec.inputs and k not in RUNNER_FINETUNE_KEYS
                     and not k.startswith("local."))
    if unknown:
        lines = [
            f"finetune.{k} is not an input of {spec.name} {spec.version or ''} ({spec.source}); {nearest_input(k, spec)}"
            for k in unknown
        ]
        raise ConfigError("\n  ".join(lines))


def prepare_inputs(
    params: Mapping[str, Any], spec: ComponentSpec, explicit_keys: Iterable[str] = ()
) -> Tuple[Dict[str, Any], List[str]]:
    """The params the component accepts, coerced to its types, and notes on what was left out.

    None values are left out (the input is optional; the component's default applies). A key the component does
    not declare is left out with a note, unless the user set it explicitly: that is an error.
    """
    check_explicit_keys(explicit_keys, spec)
    inputs: Dict[str, Any] = {}
    notes: List[str] = []
    for key, value in params.items():
        decl = spec.inputs.get(key)
        if decl is None:
            notes.append(f"finetune.{key} left out: not an input of {spec.name} {spec.version or ''}".rstrip())
            continue
        if value is None:
            continue
        inputs[key] = coerce_input(key, value, decl)
    return inputs, notes


def check_required(inputs: Mapping[str, Any], spec: ComponentSpec) -> None:
    """Inputs the component requires (optional: false, no default) must be given."""
    missing = [n for n, d in spec.inputs.items() if not d.optional and d.default is None and n not in inputs]
    if missing:
        raise ConfigError(f"{spec.name} requires input(s) {missing} that the runner does not set")


# ---- the live component against the pinned contract --------------------------------------------------------


@dataclass
class SpecDiff:
    """How the component the registry serves now differs from the contract the runner was checked against."""

    pinned: str
    live: str
    added: List[str] = field(default_factory=list)
    removed: List[str] = field(default_factory=list)
    retyped: List[str] = field(default_factory=list)  # "name: pinned type -> live type"
    # inputs whose default the live component changed: {name: {"pinned": default, "live": default}}
    redefaulted: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.retyped or self.redefaulted)

    def defaults_overridden(self, sent: Mapping[str, Any]) -> List[str]:
        """Inputs this run sends at the pinned contract's default where the registry's component now defaults to
        something else: the run overrides the new default with the old one, which nobody asked for."""
        return [f"{name}: sending {sent[name]} (the default of {self.pinned}); {self.live} defaults to "
                f"{change['live']}" for name, change in sorted(self.redefaulted.items())
                if name in sent and _same_default(sent[name], change["pinned"])]

    def lines(self) -> List[str]:
        out = []
        if self.added:
            out.append(f"inputs added in {self.live}: {', '.join(self.added)}")
        if self.removed:
            out.append(f"inputs removed in {self.live}: {', '.join(self.removed)}")
        if self.retyped:
            out.append(f"inputs retyped in {self.live}: {'; '.join(self.retyped)}")
        if self.redefaulted:
            out.append(f"defaults changed in {self.live}: " + "; ".join(
                f"{n}: {c['pinned']!r} -> {c['live']!r}" for n, c in sorted(self.redefaulted.items())))
        return out

    def to_dict(self) -> Dict[str, Any]:
        return {"pinned": self.pinned, "live": self.live, "added": self.added, "removed": self.removed,
                "retyped": self.retyped, "redefaulted": self.redefaulted}


def _same_default(a: Any, b: Any) -> bool:
    """Defaults as the specs and the inputs write them: 2e-05 == "2e-5", True == "true"."""
    if a is None or b is None:
        return a is b
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a).strip().lower() == str(b).strip().lower()


def _shape(decl: InputSpec) -> str:
    return decl.type + (f" {sorted(decl.enum)}" if decl.enum is not None else "")


def compare_specs(pinned: ComponentSpec, live: ComponentSpec) -> SpecDiff:
    diff = SpecDiff(pinned=f"{pinned.name} {pinned.version} ({pinned.source})",
                    live=f"{live.name} {live.version} ({live.source})")
    diff.added = sorted(set(live.inputs) - set(pinned.inputs))
    diff.removed = sorted(set(pinned.inputs) - set(live.inputs))
    for name in sorted(set(pinned.inputs) & set(live.inputs)):
        before, after = _shape(pinned.inputs[name]), _shape(live.inputs[name])
        if before != after:
            diff.retyped.append(f"{name}: {before} -> {after}")
        old, new = pinned.inputs[name].default, live.inputs[name].default
        if not _same_default(old, new):
            diff.redefaulted[name] = {"pinned": old, "live": new}
    return diff


def check_live_component(diff: SpecDiff, sent: Iterable[str]) -> None:
    """Inputs this run sends that the live component no longer declares: refused before submission."""
    gone = sorted(set(diff.removed) & set(sent))
    if gone:
        raise ConfigError(
            f"the registry's component no longer declares input(s) {gone} that this run sends: the runner was "
            f"checked against {diff.pinned}, the registry serves {diff.live}. Pin the checked version with "
            f"backend.component_version=<version>, or record the new contract with scripts/record_component.py "
            f"and drop the settings"
        )
