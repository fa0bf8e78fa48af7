"""What every backend shares: its name, how it plans, and the answers a step asks for before it acts, for a
backend that has nothing to add.

What a step needs the backend to *do* is that step's own small interface, written in the step's module
(`ConnectActions` in runner/steps/connect.py, `FinetuneActions` in runner/steps/finetune.py, ...): each method takes
the StepContext and returns a JSON-serialisable dict that the step turns into its typed result. Whatever is the same
on every backend (getting and checking the data, building the sample request, the quality gate) happens in the step
before the backend is asked; the backend only acts. This base class sits below the steps and both backends, so
neither side imports the other.
"""

from typing import Any, Dict, Mapping, Optional

from omegaconf import OmegaConf

from runner.finetune_params import RECORD_KEY, EffectiveFinetuneParams, decide_finetune_params


class Backend:
    name = "base"
    # True: dry_run runs the steps themselves against clients that record instead of send, then finish_plan();
    # False: dry_run calls plan(ctx), which writes what would be done into ctx.plan_dir
    plans_by_running_steps = False
    submits_jobs = False  # True: finetune submits a job that runs on elsewhere (finetune.attach_job continues one)

    cfg: Any = None  # the resolved config, set by each backend's __init__

    def finetune_params(self, ctx) -> EffectiveFinetuneParams:
        """The run's effective fine-tune parameters, decided once per run: by the model step (the model's facts
        are known then), or by the first step that needs them when the model step is not in this run. Kept on
        ctx for the later steps and in the run record (`finetune_params`) for the people who read it."""
        decided = getattr(ctx, "finetune_params", None)
        if decided is None:
            cfg = self.cfg if self.cfg is not None else ctx.cfg  # the run's config, whoever holds it
            defaults = self.model_specific_defaults(ctx) if cfg.model.apply_model_specific_defaults else {}
            decided = decide_finetune_params(cfg.finetune, defaults, ctx.explicit_finetune_keys)
            ctx.finetune_params = decided
            ctx.record.data[RECORD_KEY] = decided.to_record()
        return decided

    def model_specific_defaults(self, ctx) -> Mapping[str, Any]:
        """The foundation model's fine-tune defaults: the config's model.model_specific_defaults (the Azure
        backend reads the registry's tag instead)."""
        defaults = (self.cfg if self.cfg is not None else ctx.cfg).model.model_specific_defaults
        return OmegaConf.to_container(defaults, resolve=True) if OmegaConf.is_config(defaults) else dict(defaults or {})

    def tokenizer_dir(self, ctx) -> Optional[str]:
        """A local tokenizer the data step may count tokens with, if one is at hand without downloading."""
        return None

    def data(self, ctx, data: Dict[str, Any]) -> Dict[str, Any]:
        """Called after the shared data step with its outputs; returns extra outputs (e.g. uploaded asset ids)."""
        return {}

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
