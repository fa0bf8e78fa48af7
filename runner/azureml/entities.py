"""SDK entities as plain data: what the dry run writes as YAML and the wire bodies are built from (below the
planning clients and the YAML writers of each route, which all use it)."""

import json
from typing import Any, Dict


def plain(data: Any) -> Any:
    """OrderedDicts and other mappings the SDK returns → plain JSON-able data."""
    return json.loads(json.dumps(data, default=str))


def entity_yaml(entity: Any) -> Dict[str, Any]:
    """entity._to_dict() without empty keys (some entities' dump() writes nothing: ManagedOnlineEndpoint)."""
    return plain({k: v for k, v in entity._to_dict().items() if v is not None})
