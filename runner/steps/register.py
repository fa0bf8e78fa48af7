"""register: the fine-tuned model, versioned, with lineage to the job, the base model and the data.

A quality gate comes first: a run whose final loss is NaN/inf (it diverged) or that trained no optimizer step with a
non-zero learning rate (finetune.max_steps=0, no data) is not registered, so nothing later deploys it by mistake.
The refusal is a RunnerError (ftrun exits 2) and the run record's register step says `refused` with the reason.
`register.allow_untrained=true` / `register.allow_nonfinite_loss=true` register such a model all the same; the
version is then tagged `quality_gate=allowed: <reason>`, which `steps=[deploy]` without from_run refuses to pick.
"""

import math
from typing import Any, Dict, Optional, Protocol

from runner.errors import RunnerError
from runner.finetune_params import EffectiveFinetuneParams, recorded_decision
from runner.gate import GATE_PASSED
from runner.steps.evaluate import EvaluateResult, verdict_tags
from runner.step_results import FinetuneResult, MetricsResult, RegisterResult

# schedulers whose first step runs at learning rate 0 when warmup_steps > 0 (constant ignores warmup)
_WARMUP_FROM_ZERO = {"linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup"}


class RegisterRefused(RunnerError):
    """The quality gate refused the model; the run record marks the register step `refused`, not `failed`."""

    step_status = "refused"


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def untrained_reason(*, global_step: Any, max_steps: Any, warmup_steps: Any, lr_scheduler_type: Any) -> Optional[str]:
    """Why a run trained no optimizer step with a non-zero learning rate, or None when it did (or it is unknown)."""
    steps = _number(global_step)
    if steps is not None and steps < 1:
        return "it trained no optimizer step (global_step=0)"
    if _number(max_steps) == 0:
        # the schedule spans zero steps: transformers runs one step at learning rate 0
        return "finetune.max_steps=0: the learning-rate schedule spans no step, every step ran at learning rate 0"
    if steps == 1 and (_number(warmup_steps) or 0) > 0 and str(lr_scheduler_type) in _WARMUP_FROM_ZERO:
        return (f"its only optimizer step ran at learning rate 0 (warmup_steps={int(_number(warmup_steps))} starts "
                f"the {lr_scheduler_type} schedule at 0)")
    return None


def nonfinite_reason(figures: Dict[str, Any]) -> Optional[str]:
    """The first of the run's final losses that is NaN or infinite (the run diverged), or None."""
    for name in ("eval_loss", "train_loss"):
        value = _number(figures.get(name))
        if value is not None and not math.isfinite(value):
            return f"its final {name} is {value} (training diverged: lower finetune.learning_rate?)"
    return None


def _training_params(ctx, backend) -> Dict[str, Any]:
    """The settings the run trained with: its tracking store's record of them where the backend keeps one (the
    local MLflow run's params: right also for a finetune step from an earlier run, from_run=), else what the
    finetune step recorded it sent (a submitted job's effective_params), else the effective finetune parameters
    as decided once (this run's, or from_run's when this run has not decided: Backend.finetune_params)."""
    recorded = backend.training_params(ctx)
    if recorded is not None:
        return recorded
    sent = FinetuneResult.recorded(ctx.record).effective_params
    if sent:
        return dict(sent)
    decided = recorded_decision(ctx.record)  # this run's, else from_run's: the run that fine-tuned
    if decided is not None:
        return decided.params()
    return backend.finetune_params(ctx).params()


def improvement_refusal(ctx) -> Optional[str]:
    """register.require_improvement=<metric>: why the evaluate step's verdict on it refuses the model (`worse`:
    its 95% interval lies wholly on the worse side), or None. Without an evaluate result there is nothing to
    judge by, which is refused too (validate() says so before a run starts where it can)."""
    metric = (ctx.cfg.get("register") or {}).get("require_improvement")
    if not metric:
        return None
    from runner.evaluation.gate import improvement_refusal as refusal
    evaluation = EvaluateResult.recorded(ctx.record)
    if not evaluation.figures:
        raise RegisterRefused(f"quality gate: register.require_improvement={metric} needs the evaluate step's "
                              f"verdicts: run steps=[...,evaluate,register,...] (or from_run= a run that evaluated)")
    return refusal({"metrics": evaluation.figures}, metric)


def quality_gate(ctx, backend) -> str:
    """GATE_PASSED, or `allowed: <reason>` when the config opts out; raises RegisterRefused otherwise."""
    finetune = ctx.record.output("finetune") or {}
    figures = {**(MetricsResult.recorded(ctx.record).final or {}), **finetune}
    gate = ctx.cfg.get("register") or {}
    reasons = []
    diverged = nonfinite_reason(figures)
    if diverged:
        reasons.append((diverged, "allow_nonfinite_loss"))
    params = _training_params(ctx, backend) if finetune else {}
    untrained = untrained_reason(global_step=finetune.get("global_step"), max_steps=params.get("max_steps"),
                                 warmup_steps=params.get("warmup_steps"),
                                 lr_scheduler_type=params.get("lr_scheduler_type"))
    if untrained:
        reasons.append((untrained, "allow_untrained"))
    refused = [(why, key) for why, key in reasons if not gate.get(key, False)]
    worse = improvement_refusal(ctx)
    if worse:
        raise RegisterRefused("quality gate: the model is not registered: " + "; ".join(
            [worse] + [f"{why} (register.{key}=true registers it all the same)" for why, key in refused]))
    if refused:
        raise RegisterRefused("quality gate: the model is not registered: " + "; ".join(
            f"{why} (register.{key}=true registers it all the same)" for why, key in refused))
    if reasons:
        return "allowed: " + "; ".join(why for why, _ in reasons)
    return GATE_PASSED


class RegisterActions(Protocol):
    """What the register step asks of a backend."""

    def training_params(self, ctx) -> Optional[Dict[str, Any]]: ...

    def finetune_params(self, ctx) -> EffectiveFinetuneParams: ...

    def register(self, ctx) -> Dict[str, Any]: ...


def run(ctx, backend: RegisterActions) -> RegisterResult:
    verdict = quality_gate(ctx, backend)
    if verdict != GATE_PASSED:
        ctx.say(f"warning: registering a model that did not pass the quality gate: {verdict}")
    ctx.quality_gate = verdict  # the backend tags the version with it
    ctx.version_tags.update(verdict_tags(EvaluateResult.recorded(ctx.record)))
    result = RegisterResult.from_outputs(backend.register(ctx))
    result.quality_gate = verdict
    return result
