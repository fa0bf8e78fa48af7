"""The shipped presets (conf/<group>/*.yaml) as data, for messages that name a preset the user can switch to.

Each preset is read as its plain mapping (a `# @package _global_` preset: its `<group>` node), without Hydra: this
runs only when a message needs it (a refusal), and it must not depend on the command line that is being refused.
"""

from typing import Any, Dict, List

from runner.paths import CHECKOUT

CONF_DIR = CHECKOUT / "conf"

# What each backend needs of the compute and deployment presets (their `kind`): a local run cannot use an Azure
# cluster, and an Azure run cannot train on `size: cpu` or deploy to a local endpoint. The first kind listed is the
# one a refusal suggests; the others are the Azure routes' own (runner/azure_routes.py checks which goes with which).
BACKEND_KINDS = {"local": {"compute": ["local"], "deployment": ["local"]},
                 "azureml": {"compute": ["azure", "serverless"], "deployment": ["managed_online", "serverless"]}}
# deployment.kind=azure is the name managed_online had before serverless endpoints existed: one kind, two spellings,
# so that a config written then still means what it meant.
KIND_ALIASES = {("deployment", "azure"): "managed_online"}
_KIND_WORDS = {("compute", "local"): "a local compute preset (this machine)",
               ("compute", "azure"): "an Azure ML cluster preset",
               ("compute", "serverless"): "serverless (no compute of yours: Azure's own capacity)",
               ("deployment", "local"): "a local endpoint preset",
               ("deployment", "managed_online"): "an Azure ML managed online endpoint preset",
               ("deployment", "serverless"): "an Azure ML serverless endpoint preset"}
_NEEDS = {("compute", "local"): "runs on this machine", ("compute", "azure"): "needs an Azure ML cluster",
          ("deployment", "local"): "serves on this machine",
          ("deployment", "managed_online"): "needs a managed online endpoint"}
_DEFAULT_KIND = {"compute": "azure", "deployment": "local"}  # the schema's defaults (ComputeConfig, DeploymentConfig)


def canonical_kind(group: str, kind: Any) -> Any:
    return KIND_ALIASES.get((group, kind), kind)


def group_presets(group: str) -> Dict[str, Any]:
    """conf/<group>/*.yaml by preset name (sorted), each as its plain mapping."""
    from omegaconf import OmegaConf

    found: Dict[str, Any] = {}
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        node = OmegaConf.load(path)
        if path.read_text().lstrip().startswith("# @package _global_"):
            node = node.get(group)
        if node is not None:
            found[path.stem] = node
    return found


def presets_of_kind(group: str, kind: str) -> List[str]:
    return [name for name, p in group_presets(group).items()
            if canonical_kind(group, p.get("kind", _DEFAULT_KIND[group])) == canonical_kind(group, kind)]


def compute_presets_for(allow_list: List[str]) -> List[str]:
    """Azure compute presets whose size is in `allow_list` (case-insensitive), in the allow list's order."""
    presets = {name: p for name, p in group_presets("compute").items() if p.get("kind", "azure") == "azure"}
    found = []
    for size in allow_list:
        found += [name for name, p in presets.items()
                  if str(p.get("size", "")).lower() == str(size).lower() and name not in found]
    return found


def kind_errors(cfg: Any) -> List[str]:
    """compute.kind and deployment.kind must be the backend's; each message names the presets that are."""
    kinds = BACKEND_KINDS.get(cfg.backend.name)
    errors: List[str] = []
    if kinds is None:
        return errors
    for group in ("compute", "deployment"):
        node = cfg[group]
        want = kinds[group][0]
        if canonical_kind(group, node.kind) in kinds[group]:
            continue
        presets = group_presets(group)
        right = presets_of_kind(group, want)
        if group == "compute" and want == "azure" and cfg.model.get("finetune_compute_allow_list"):
            # the model's own list first: a size outside it is refused by the model step anyway
            right = compute_presets_for(list(cfg.model.finetune_compute_allow_list)) or right
        kind = canonical_kind(group, node.kind)
        current = [name for name, p in presets.items()
                   if canonical_kind(group, p.get("kind", _DEFAULT_KIND[group])) == kind
                   and (group == "deployment" or str(p.get("size")) == str(node.size))]
        named = f"{group}={current[0]}" if current else f"{group}.kind={node.kind}"
        detail = f" (compute.size={node.size})" if group == "compute" else ""
        what = _KIND_WORDS.get((group, canonical_kind(group, node.kind)), f"of kind {node.kind}")
        errors.append(f"{group}.kind={node.kind}: {named}{detail} is {what}; backend={cfg.backend.name} "
                      f"{_NEEDS[(group, want)]}: {group}=" + " | ".join(right))
    return errors
