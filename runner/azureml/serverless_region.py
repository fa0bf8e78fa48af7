"""Before a serverless fine-tune is submitted: is the workspace a hub-based project, in a region where the model's
fine-tuned version can be served serverless?

Azure's serverless fine-tuning sample (azureml-examples, model-as-a-service/chat-completion, and the Foundry docs'
"Fine-tune models using standard deployments") reads the foundation model's `maas-finetuning-deploy-regions` tag and
compares it with the workspace's `location` before it creates the serverless endpoint. Checked only there, an
unsupported region fails at deploy, after the training was paid for; so the runner checks it first, and also that
the workspace is a project (an AI Foundry hub's project, `kind: project`), which serverless fine-tuning needs."""

from typing import Any, List, Optional

from runner.schema import ConfigError

REGIONS_TAG = "maas-finetuning-deploy-regions"


def parse_regions(value: Any) -> List[str]:
    """The tag's value: a list, or one string of names separated by commas/spaces (also a JSON-ish list)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        items = value
    else:
        items = str(value).replace("[", " ").replace("]", " ").replace("'", " ").replace('"', " ").replace(",", " ")
        items = items.split()
    return [str(r).strip().lower() for r in items if str(r).strip()]


def serverless_regions(foundation_model: Any, model_cfg: Any, facts_apply: bool) -> Optional[List[str]]:
    """The regions from the registry model's tag; else from the model preset (model.serverless_regions) when its
    facts are this model's; None when neither says."""
    tags = getattr(foundation_model, "tags", None) or {}
    if REGIONS_TAG in tags:
        return parse_regions(tags[REGIONS_TAG])
    listed = list(model_cfg.get("serverless_regions") or []) if facts_apply else []
    return parse_regions(listed) or None


def check_serverless_workspace(workspace: Any, regions: Optional[List[str]], model_name: str) -> None:
    kind = str(getattr(workspace, "_kind", "") or "").lower()
    name = getattr(workspace, "name", None) or "the workspace"
    if kind and kind != "project":
        raise ConfigError(
            f"workspace {name} is a {kind!r} workspace: serverless fine-tuning (compute=serverless) runs in an AI "
            f"Foundry hub's project (kind 'project'); set backend.workspace_name to a project, or fine-tune on a "
            f"cluster (compute=<a cluster preset>, finetune.route=pipeline)")
    location = str(getattr(workspace, "location", "") or "").lower()
    if regions is not None and location not in regions:
        raise ConfigError(
            f"workspace {name} is in {location or 'an unknown region'}, where {model_name} fine-tuned serverless "
            f"cannot be deployed: its {REGIONS_TAG} are {', '.join(regions)}; use a project in one of them")
