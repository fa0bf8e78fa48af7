"""A step's typed result: the fields every backend reports, plus the backend's own details.

In the run record a result is one flat mapping (the fields and the details side by side), the shape records have
always had, so `from_run=` works across versions; `from_outputs` reads it back typed.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Type, TypeVar

T = TypeVar("T", bound="StepResult")


@dataclass
class StepResult:
    details: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def field_names(cls) -> list:
        return [f.name for f in dataclasses.fields(cls) if f.name != "details"]

    @classmethod
    def from_outputs(cls: Type[T], outputs: Optional[Dict[str, Any]]) -> T:
        outputs = dict(outputs or {})
        known = {name: outputs.pop(name) for name in cls.field_names() if name in outputs}
        return cls(**known, details=outputs)

    @classmethod
    def from_record(cls: Type[T], record: Dict[str, Any], step: str) -> Optional[T]:
        """The step's result in a record (a RunRecord's data or a loaded run_record.json), None unless it ran ok."""
        entry = (record.get("steps") or {}).get(step) or {}
        return cls.from_outputs(entry.get("outputs")) if entry.get("status") == "ok" else None

    def to_outputs(self) -> Dict[str, Any]:
        out = {name: getattr(self, name) for name in self.field_names() if getattr(self, name) is not None}
        return {**self.details, **out}
