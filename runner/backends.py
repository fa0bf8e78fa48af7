"""The one seam between what a step does and where it runs.

A backend implements one method per step. Each takes the StepContext (resolved config, run dir, run record,
explicit overrides, live objects shared between steps of this process) and returns a JSON-serialisable dict that the
workflow stores in the run record. Shared work that is the same on every backend (getting and checking the data,
building the sample request) happens in the workflow before the backend's method is called.
"""

from typing import Any, Dict, Optional


class Backend:
    name = "base"
    # True: dry_run runs the steps themselves against clients that record instead of send, then finish_plan()
    plans_by_running_steps = False

    def connect(self, ctx) -> Dict[str, Any]:
        raise NotImplementedError

    def model(self, ctx) -> Dict[str, Any]:
        raise NotImplementedError

    def compute(self, ctx) -> Dict[str, Any]:
        raise NotImplementedError

    def tokenizer_dir(self, ctx) -> Optional[str]:
        """A local tokenizer the data step may count tokens with, if one is at hand without downloading."""
        return None

    def data(self, ctx, data: Dict[str, Any]) -> Dict[str, Any]:
        """Called after the shared data step with its outputs; returns extra outputs (e.g. uploaded asset ids)."""
        return {}

    def finetune(self, ctx) -> Dict[str, Any]:
        raise NotImplementedError

    def metrics(self, ctx) -> Dict[str, Any]:
        raise NotImplementedError

    def register(self, ctx) -> Dict[str, Any]:
        raise NotImplementedError

    def deploy(self, ctx) -> Dict[str, Any]:
        raise NotImplementedError

    def test(self, ctx, request_file) -> Dict[str, Any]:
        raise NotImplementedError

    def cleanup(self, ctx) -> Dict[str, Any]:
        raise NotImplementedError

    def finish_plan(self, ctx) -> Dict[str, Any]:
        """After a dry run of the steps: write the plan's summary (plans_by_running_steps backends)."""
        raise NotImplementedError

    def plan(self, ctx) -> Dict[str, Any]:
        """dry_run: write what would be done into ctx.plan_dir; no network, credentials or training."""
        raise NotImplementedError


def make_backend(cfg) -> Backend:
    if cfg.backend.name == "local":
        from runner.local.backend import LocalBackend

        return LocalBackend(cfg)
    if cfg.backend.name == "azureml":
        from runner.azureml.backend import AzureMLBackend

        return AzureMLBackend(cfg)
    raise ValueError(f"backend.name={cfg.backend.name!r}: expected 'local' or 'azureml'")
