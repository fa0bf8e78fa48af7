"""The registry's own REST body of a model version, for what azure-ai-ml's Model entity drops.

azure-ai-ml 1.35.2 builds a registry model with `Model._from_rest_object`, which keeps tags and properties but not
the version's system metadata (where current models such as Phi-4 keep their SKU allow lists and deprecation dates)
nor its isArchived flag. The registry client's ModelOperations holds the lower-level service client it GETs the
version with (`_registry_service_client`, bound to the registry's data-plane endpoint); the SDK's own
`get_registry_versioned_asset` makes that same GET and returns the raw body. Private names of the SDK: if a later
release moves them, the body is reported unreadable and the model preset's facts are used, saying so.
"""

from typing import Any, Dict, Optional, Tuple


def model_version_body(models_ops: Any, name: str, version: str) -> Tuple[Optional[Dict[str, Any]], str]:
    """(the raw REST body of registry model `name` version `version`, or None; why not, when None)."""
    try:
        from azure.ai.ml._utils._registry_utils import get_registry_versioned_asset

        client = models_ops._registry_service_client
        resource_group, registry = models_ops._resource_group_name, models_ops._registry_name
    except (ImportError, AttributeError) as exc:
        return None, f"this azure-ai-ml has no raw registry GET ({type(exc).__name__}: {exc})"
    if client is None:
        return None, "the models client is not a registry client"
    try:
        body = get_registry_versioned_asset(client, "models", name, version, resource_group, registry)
    except Exception as exc:  # network, auth, 404: the model step says so and goes on with what it has
        return None, f"GET {name}/versions/{version} failed ({type(exc).__name__}: {str(exc)[:200]})"
    return (body, "") if isinstance(body, dict) else (None, f"GET {name}/versions/{version} returned no JSON object")
