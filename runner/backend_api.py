"""What the steps ask of a backend: one method per step, each a small interface of its own.

A backend implements the methods of the steps it runs. Each takes the StepContext (resolved config, run dir, run
record, explicit overrides) and returns a JSON-serialisable dict that its step (runner/steps/<step>.py) turns into
the step's typed result. Whatever is the same on every backend (getting and checking the data, building the sample
request, the quality gate) happens in the step before the backend is asked; the backend only acts. This base class
sits below the steps and both backends, so neither side imports the other.
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

    # -- what a step asks before it acts: answered here for a backend that has nothing to add --

    submits_jobs = False  # True: finetune submits a job that runs on elsewhere (finetune.attach_job continues one)

    def job_to_attach(self, ctx) -> tuple:
        """(job name, why) of a submitted job this run continues instead of training; (None, "") when none."""
        return None, ""

    def training_params(self, ctx) -> Optional[Dict[str, Any]]:
        """The settings the finetune step's run trained with, as its tracking store recorded them; None when the
        backend keeps none (the register step then reads this config's effective parameters)."""
        return None

    def has_endpoint(self, ctx) -> bool:
        """Whether cleanup has an endpoint to delete (this run's deploy, from_run's, or endpoint_name=)."""
        return True

    def finish_plan(self, ctx) -> Dict[str, Any]:
        """After a dry run of the steps: write the plan's summary (plans_by_running_steps backends)."""
        raise NotImplementedError

    def plan(self, ctx) -> Dict[str, Any]:
        """dry_run: write what would be done into ctx.plan_dir; no network, credentials or training."""
        raise NotImplementedError
