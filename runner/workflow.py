"""The workflow: the notebook's steps, in order, over one resolved config.

    connect → model → compute → data → finetune → metrics → register → deploy → test → cleanup

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Set

from omegaconf import DictConfig, OmegaConf

from runner.atomic import write_json, write_text
from runner.figures import figure
from runner.record import RunRecord, load_record
from runner.schema import STEPS, ConfigError, validate

RESOLVED_CONFIG = "resolved_config.yaml"
# The sample request of a dry run when the sample split is not on disk (a dry run downloads nothing).
EXAMPLE_CONVERSATION = [
    {"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."},
]


@dataclass
class StepContext:
    cfg: DictConfig
    run_dir: Path
    record: RunRecord
    explicit_finetune_keys: Set[str] = field(default_factory=set)
    task_overrides: list = field(default_factory=list)
    live: Dict[str, Any] = field(default_factory=dict)  # objects shared between steps of this process
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


def config_sha256(cfg: DictConfig) -> str:
    blob = json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def write_resolved_config(cfg: DictConfig, run_dir: Path) -> Path:
    return write_text(run_dir / RESOLVED_CONFIG, OmegaConf.to_yaml(cfg, resolve=True))


# ---- steps: shared work, then the backend's part -------------------------------------------------------------


def step_data(ctx: StepContext, backend) -> Dict[str, Any]:
    from runner.data.step import run_data_step

    cfg = ctx.cfg
    tokenizer_dir = ctx.record.output("model", "tokenizer_dir") or backend.tokenizer_dir(ctx)
    outputs = run_data_step(
        cfg.dataset,
        run_dir=ctx.run_dir,
        max_seq_length=cfg.finetune.max_seq_length,
        tokenizer_dir=tokenizer_dir,
        dry_run=bool(cfg.dry_run),  # a plan names the files; nothing is downloaded
    )
    # Recorded absolute: a later run (from_run=) started from another directory must find the same files.
    for key in ("train_file", "test_file", "sample_file", "download_dir"):
        if outputs.get(key):
            outputs[key] = str(Path(outputs[key]).resolve())
    outputs["files"] = {k: str(Path(v).resolve()) for k, v in (outputs.get("files") or {}).items()}
    outputs.update(backend.data(ctx, outputs) or {})
    return outputs


def sample_file(ctx: StepContext) -> Path:
    """The split whose seeded random row becomes the sample request (the data step's file, else where it goes)."""
    recorded = ctx.record.output("data", "sample_file")
    if recorded:
        return Path(recorded)
    return Path(ctx.cfg.dataset.download_dir) / f"{ctx.cfg.dataset.sample_split}.jsonl"


def write_sample_request(ctx: StepContext, path: Path) -> Dict[str, Any]:
    from runner.data.sample_request import build_sample_request

    source = sample_file(ctx)
    if not source.exists() and ctx.cfg.dry_run:  # a plan downloads nothing: an example conversation stands in
        request = {"input_data": {"input_string": [EXAMPLE_CONVERSATION],
                                  "parameters": OmegaConf.to_container(ctx.cfg.deployment.sample_parameters)},
                   "params": {}}
        write_json(path, request)
        return request
    if not source.exists():
        raise FileNotFoundError(
            f"the sample request is drawn from {source}, which does not exist: run the data step first "
            f"(steps=[data,...]) or point from_run= at a run that did"
        )
    request = build_sample_request(source, ctx.cfg.seed, OmegaConf.to_container(ctx.cfg.deployment.sample_parameters))
    write_json(path, request)
    return request


def step_test(ctx: StepContext, backend) -> Dict[str, Any]:
    request_file = ctx.run_dir / "sample_score.json"
    write_sample_request(ctx, request_file)
    outputs = backend.test(ctx, request_file)
    outputs["request_file"] = str(request_file)
    return outputs


def _delegate(name: str) -> Callable[[StepContext, Any], Dict[str, Any]]:
    def step(ctx: StepContext, backend) -> Dict[str, Any]:
        return getattr(backend, name)(ctx)

    step.__name__ = f"step_{name}"
    return step


STEP_FUNCTIONS: Dict[str, Callable[[StepContext, Any], Dict[str, Any]]] = {
    name: _delegate(name) for name in STEPS
}
STEP_FUNCTIONS["data"] = step_data
STEP_FUNCTIONS["test"] = step_test


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
    record.save()

    if cfg.dry_run and not backend.plans_by_running_steps:
        _run_one(ctx, "plan", lambda c: backend.plan(c))
        record.close()
        print(f"dry run: plan written to {ctx.plan_dir}")
        return record

    steps = selected_steps(cfg.steps)
    if sweep:  # sweep jobs train and evaluate; the best one is registered/deployed after the sweep
        steps = [s for s in steps if s in cfg.sweep.job_steps]
    try:
        for i, name in enumerate(steps, 1):
            print(f"==> [{i}/{len(steps)}] {name}", flush=True)
            outputs = _run_one(ctx, name, lambda c, n=name: STEP_FUNCTIONS[n](c, backend))
            if name == "finetune" and outputs.get("status") == "submitted" and name != steps[-1]:
                # backend.wait=false: the job runs on; the later steps need its result, so they wait for a
                # later run (`from_run=` this run dir) or, in a sweep, for the summary to collect every job.
                record.data["deferred_steps"] = steps[i:]
                print(f"    job submitted without waiting; deferred: {steps[i:]} (run them later with "
                      f"from_run={run_dir})", flush=True)
                break
    except BaseException:
        _release_after_failure(ctx, backend)
        raise
    if cfg.dry_run:  # the same steps ran against recording clients: their record becomes the plan's summary
        _run_one(ctx, "plan", lambda c: backend.finish_plan(c))
        record.close()
        print(f"dry run: plan written to {ctx.plan_dir}")
        return record
    record.close()
    _print_summary(record)
    return record


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
    ("register", "model_uri", "registered model"),
    ("deploy", "scoring_uri", "endpoint"),
    ("test", "reply", "sample reply"),
    ("cleanup", "deleted", "endpoint deleted"),
]


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
    lines.append(f"  {'run record':<18} {record.path}")
    print("\nSummary\n" + "\n".join(lines), flush=True)
