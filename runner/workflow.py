"""The workflow: the notebook's steps, in order, over one resolved config.

    connect → model → compute → data → finetune → metrics → evaluate → register → export → deploy → test → cleanup

`steps=[...]` selects which run (always in this order). Each step reads the config and earlier steps' outputs
(from this run's record, or an earlier run's with `from_run=`), asks the backend to do its part, and its outputs go
into `<run dir>/run_record.json`. `dry_run=true` on azureml runs the same steps with clients that record what they
would send (runner/azureml/planning.py) and writes it into `<run dir>/plan/`; on local the backend writes its plan.
"""

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional

from omegaconf import DictConfig, OmegaConf

from runner.atomic import write_text
from runner.figures import figure
from runner.record import RunRecord, load_record
from runner.schema import STEPS, ConfigError, validate
from runner.steps import run_step
from runner.steps.context import StepContext

RESOLVED_CONFIG = "resolved_config.yaml"


def config_sha256(cfg: DictConfig) -> str:
    blob = json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_resolved_config(cfg: DictConfig, run_dir: Path) -> Path:
    return write_text(run_dir / RESOLVED_CONFIG, OmegaConf.to_yaml(cfg, resolve=True))


def selected_steps(steps: Iterable[str]) -> list:
    chosen = set(steps)
    return [s for s in STEPS if s in chosen]


# ---- the run -----------------------------------------------------------------------------------------------


def run(
    cfg: DictConfig,
    *,
    run_dir: Optional[os.PathLike] = None,
    task_overrides: Iterable[str] = (),
    backend=None,
    sweep: Optional[Dict[str, Any]] = None,
) -> RunRecord:
    """Validate, then run the selected steps (or write the plan). Returns the run record."""
    from runner.backends import make_backend
    from runner.finetune_params import explicit_finetune_keys

    validate(cfg)
    run_dir = Path(run_dir or os.getcwd())
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        write_resolved_config(cfg, run_dir)
    except Exception as exc:  # an unresolvable interpolation is a config error, said before anything runs
        raise ConfigError(f"the config does not resolve: {exc}") from exc

    earlier = load_record(cfg.from_run) if cfg.from_run else None
    backend = backend or make_backend(cfg)
    record = RunRecord(run_dir, backend=backend.name, config_sha256=config_sha256(cfg), earlier=earlier)
    overrides = list(task_overrides)
    ctx = StepContext(
        cfg=cfg,
        run_dir=run_dir,
        record=record,
        explicit_finetune_keys=explicit_finetune_keys(overrides),
        task_overrides=overrides,
        sweep=sweep,
    )
    record.data["overrides"] = overrides
    if sweep:
        record.data["sweep"] = sweep
    if not cfg.dry_run:  # what killed runs left behind is settled; this run is listed until it ends
        from runner.reaper import reap

        found = reap(cfg.paths.root, cfg.mlflow.artifact_location)
        if any(found.values()):
            record.data["reaped"] = found
        record.track(cfg.paths.root)
    record.save()

    if cfg.dry_run and not backend.plans_by_running_steps:
        return _write_plan(ctx, backend.plan)

    steps = selected_steps(cfg.steps)
    if sweep:  # sweep jobs train and evaluate; the best one is registered/deployed after the sweep
        steps = [s for s in steps if s in cfg.sweep.job_steps]
    from runner.quiet import third_party_bars_off

    try:
        with third_party_bars_off():  # one progress display per step: the runner's own
            _run_steps(ctx, steps, backend, run_dir)
    except BaseException:
        _release_after_failure(ctx, backend)
        raise
    if cfg.dry_run:  # the same steps ran against recording clients: their record becomes the plan's summary
        return _write_plan(ctx, backend.finish_plan)
    record.close()
    _print_summary(record)
    return record


def _run_steps(ctx: StepContext, steps, backend, run_dir: Path) -> None:
    """The selected steps in order; a finetune submitted without waiting defers the rest."""
    record = ctx.record
    for i, name in enumerate(steps, 1):
        print(f"==> [{i}/{len(steps)}] {name}", flush=True)
        outputs = _run_one(ctx, name, lambda c, n=name: run_step(n, c, backend))
        if name == "finetune" and outputs.get("status") == "submitted" and name != steps[-1]:
            # backend.wait=false: the job runs on; the later steps need its result, so they wait for a
            # later run (`from_run=` this run dir) or, in a sweep, for the summary to collect every job.
            record.data["deferred_steps"] = steps[i:]
            print(f"    job submitted without waiting; deferred: {steps[i:]} (run them later with "
                  f"from_run={run_dir})", flush=True)
            break


def _write_plan(ctx: StepContext, write: Callable[[StepContext], Dict[str, Any]]) -> RunRecord:
    _run_one(ctx, "plan", write)
    ctx.record.close()
    print(f"dry run: plan written to {ctx.plan_dir}")
    return ctx.record


def _run_one(ctx: StepContext, name: str, fn: Callable[[StepContext], Dict[str, Any]]) -> Dict[str, Any]:
    ctx.record.start(name)
    started = time.time()
    try:
        outputs = fn(ctx) or {}
    except BaseException as exc:
        ctx.record.fail(name, exc)
        raise
    ctx.record.finish(name, outputs)
    print(f"    {name} done in {time.time() - started:.1f}s", flush=True)
    return outputs


def _release_after_failure(ctx: StepContext, backend) -> None:
    """A failed run leaves nothing running: an endpoint this run deployed is deleted (unless asked to keep it)."""
    deployed_here = ctx.record.status("deploy") == "ok" and ctx.record.status("cleanup") != "ok"
    if deployed_here and not ctx.cfg.deployment.keep_alive:
        try:
            ctx.record.start("cleanup")
            ctx.record.finish("cleanup", backend.cleanup(ctx))
        except Exception as exc:  # the original failure is what the user must see
            print(f"warning: cleanup after failure failed: {exc}", file=sys.stderr)


SUMMARY_KEYS = [
    ("data", "download_dir", "data"),
    ("data", "exploration", "data exploration"),
    ("finetune", "mlflow_run_id", "MLflow run"),
    ("finetune", "eval_loss_before", "eval loss before"),
    ("finetune", "eval_loss", "eval loss after"),
    ("metrics", "plot", "loss curve"),
    ("evaluate", "report_md", "evaluation"),
    ("register", "model_uri", "registered model"),
    ("deploy", "scoring_uri", "endpoint"),
    ("test", "reply", "sample reply"),
    ("cleanup", "deleted", "endpoint deleted"),
]


def _export_lines(record: RunRecord) -> list:
    """Each exported format's path and size (the export step's outputs)."""
    if record.status("export") != "ok":
        return []
    from runner.export.files import human_size

    from runner.steps.export import ExportResult

    outputs = ExportResult.recorded(record).outputs or {}
    return [f"  {'export ' + fmt:<18} {info['path']} ({human_size(info['bytes'])})" for fmt, info in outputs.items()]


def _print_summary(record: RunRecord) -> None:
    lines = []
    for step, key, label in SUMMARY_KEYS:
        if record.status(step) == "ok":
            value = record.output(step, key)
            if value is not None and value != {}:
                if isinstance(value, dict):
                    value = value.get("plot") or value.get("summary_md") or json.dumps(value)
                text = figure(value) if isinstance(value, float) else str(value)
                lines.append(f"  {label:<18} {text if len(text) < 300 else text[:297] + '...'}")
    lines += _export_lines(record)
    lines.append(f"  {'run record':<18} {record.path}")
    print("\nSummary\n" + "\n".join(lines), flush=True)
