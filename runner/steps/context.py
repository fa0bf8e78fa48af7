"""What every step is handed: the resolved config, the run dir, the run record, the user's explicit overrides,
objects shared between steps of this process, and the sweep this run belongs to (if any)."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Set

from omegaconf import DictConfig

from runner.finetune_params import EffectiveFinetuneParams
from runner.record import RunRecord


@dataclass
class StepContext:
    cfg: DictConfig
    run_dir: Path
    record: RunRecord
    explicit_finetune_keys: Set[str] = field(default_factory=set)
    task_overrides: list = field(default_factory=list)
    # What earlier steps of this process hand on that is not in the run record, each typed:
    finetune_params: Optional[EffectiveFinetuneParams] = None  # decided once per run (Backend.finetune_params)
    quality_gate: Optional[str] = None  # the register step's verdict, which the backend tags the version with
    version_tags: Dict[str, str] = field(default_factory=dict)  # more tags for that version (evaluate's verdicts)
    endpoint: Optional[Dict[str, Any]] = None  # the endpoint this process deployed (local: its server's state)
    connection: Any = None  # what the connect step opened (azureml: an AzureSession), reused by later steps
    sweep: Optional[Dict[str, Any]] = None  # multirun job: {"id", "job_num", "swept": {key: value}, "dir"}

    def display_name(self, base: str) -> str:
        """A sweep job's name tells it apart from its siblings: the swept values are appended."""
        if not self.sweep or not self.sweep.get("swept"):
            return base
        return base + "".join(f"-{k.split('.')[-1]}={v}" for k, v in sorted(self.sweep["swept"].items()))

    def tracking_tags(self) -> Dict[str, str]:
        if not self.sweep:
            return {}
        return {
            "sweep_id": str(self.sweep["id"]),
            "sweep_job": str(self.sweep["job_num"]),
            "sweep_overrides": " ".join(f"{k}={v}" for k, v in sorted(self.sweep["swept"].items())),
        }

    @property
    def plan_dir(self) -> Path:
        return self.run_dir / "plan"

    def say(self, message: str) -> None:
        print(f"    {message}", flush=True)
