"""`ftrun`: the Hydra app. Composes conf/ into one validated config and hands it to the workflow.

Only hydra/omegaconf are imported at module level: heavy libraries load inside the steps that use them.
"""

import logging
import math
import os
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

from runner.schema import register_configs

register_configs()

# conf/ sits beside the package (editable install); an absolute path keeps Hydra from looking for a `conf` module.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def main() -> None:
    """`ftrun`: a `key=value` typo is refused with the schema's "did you mean", then Hydra runs the app."""
    problems = unknown_override_keys(sys.argv[1:])
    if problems:
        print("ftrun: invalid config:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        sys.exit(2)
    _hydra_main()


def unknown_override_keys(args: list) -> list:
    """The messages for `key=value` overrides (no +) whose key the schema lacks. Hydra would refuse them too, but
    with "Could not override ... use +key=value", which invites adding the typo; `+key=value` reaches validate()
    and gets the same message as here. Groups (`finetune=lora`, `experiment=...`), hydra.*, +/++/~ and anything
    Hydra cannot parse are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from runner.schema import unknown_key

    candidates = [a for a in args if "=" in a and not a.startswith(("-", "+", "~", "hydra.", "hydra/"))]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except Exception:  # a syntax error: Hydra's own message says where
        return []
    groups = {p.name for p in Path(CONF_DIR).iterdir() if p.is_dir()}
    problems = []
    for override in overrides:
        key = override.key_or_group
        if override.package is not None or "/" in key or key in groups:
            continue
        problem = unknown_key(key)
        if problem:
            problems.append(problem)
    return problems


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    # Hydra's job logging is INFO for every library: keep the HTTP client's per-request lines out of the output.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # The Azure SDK warns "experimental class" for every schema class it loads: noise to a user of this runner.
    logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    sweep = None
    if multirun:
        from runner.sweep.context import job_sweep_context

        sweep = job_sweep_context(hc)
    from runner.console_log import LOG_NAME, ConsoleLog

    from runner.signals import stop_raises_interrupt

    # SIGINT, SIGTERM and SIGHUP end ftrun the way Ctrl-C does (KeyboardInterrupt("SIGTERM") in the main thread),
    # so the run record marks the step, a failed run releases its endpoint and a kept-alive endpoint is deleted,
    # also when ftrun was started with SIGINT ignored (a background job). Training swaps in its own handler while
    # it runs, to save a checkpoint first. The previous handlers are back when the job ends.
    with stop_raises_interrupt(), ConsoleLog(run_dir / LOG_NAME) as console:
        return _run_job(cfg, run_dir, list(hc.overrides.task), multirun, sweep, console)


def _run_job(cfg: DictConfig, run_dir: Path, overrides: list, multirun: bool, sweep, console) -> float | None:
    from runner.errors import RunnerError
    from runner.workflow import run

    try:
        record = run(cfg, run_dir=run_dir, task_overrides=overrides, sweep=sweep)
    except KeyboardInterrupt as exc:
        # Ctrl-C or SIGTERM: training saved a checkpoint first and says how to resume; no traceback needed.
        print(f"ftrun: interrupted{': ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        sys.exit(130)
    except RunnerError as exc:
        # A problem the user must fix (config, compute, data, credentials): say what and where, no traceback.
        print(f"ftrun: {exc}", file=sys.stderr)
        if not multirun:
            sys.exit(2)
        _mark_job_failed(run_dir, exc, sweep)
        return _worst(cfg)
    except Exception as exc:
        short = _short_failure(cfg, exc)
        if short and not multirun:  # a fault the user can act on: a few lines here, the traceback in ftrun.log
            console.file_only(traceback.format_exc())
            _print_short(f"ftrun: {short}\n  (traceback in {run_dir / 'ftrun.log'})")
            sys.exit(1)
        if not multirun:
            console.file_only(traceback.format_exc())  # Hydra prints it to the console after main() returns
            raise
        # One failed job must not stop the sweep: it is marked failed and the summary reports it.
        traceback.print_exc()
        _mark_job_failed(run_dir, exc, sweep)
        return _worst(cfg)
    value = record.objective(cfg.sweep.metric)
    return value if value is not None else _worst(cfg)


def _short_failure(cfg: DictConfig, exc: BaseException):
    from runner.failures import short_failure
    from runner.local.store import sqlite_file

    try:
        store = sqlite_file(str(cfg.mlflow.tracking_uri))
        return short_failure(exc, str(store) if store else None, str(cfg.paths.root))
    except Exception:  # the config itself may be what failed: keep the traceback
        return None


def _print_short(text: str) -> None:
    """Straight to descriptor 2, which the console log tees into ftrun.log too: the short message sits under the
    traceback there."""
    sys.stderr.flush()
    os.write(2, (text + "\n").encode("utf-8", "replace"))


def _worst(cfg: DictConfig) -> float:
    """What a job without a metric (failed, or a dry run) reports to an optimising sweeper: the worst value.
    (Optuna refuses NaN; an infinite value ranks the trial last without aborting the study.)"""
    return math.inf if cfg.sweep.direction == "minimize" else -math.inf


def _mark_job_failed(run_dir: Path, exc: BaseException, sweep) -> None:
    from runner.atomic import write_json
    from runner.record import RECORD_FILE

    path = run_dir / RECORD_FILE
    if path.exists():  # the workflow already recorded which step failed
        return
    write_json(path, {"run_dir": str(run_dir.resolve()), "status": "failed", "sweep": sweep, "steps": {},
                             "error": {"step": "config", "message": f"{type(exc).__name__}: {exc}"}})


if __name__ == "__main__":
    main()
