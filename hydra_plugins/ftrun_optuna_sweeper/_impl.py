"""The Optuna study behind FtrunOptunaSweeper: the search space from Hydra's override grammar, then ask a batch of
trials, launch them as Hydra jobs, tell the study what each job returned, until n_trials have run."""

import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import optuna
from omegaconf import OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.utils import JobReturn, JobStatus

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.yaml"


def _number(value: Any) -> Any:
    """Hydra may parse numbers as Decimal in ranges; Optuna wants int or float."""
    return value if isinstance(value, int) and not isinstance(value, bool) else float(value)


def distribution(override: Override) -> BaseDistribution:
    """One search dimension from a sweep override:
    `a,b,c` / `choice(a, b, c)` -> categorical;
    `range(start, stop[, step])` -> integers (or floats) on that grid, stop excluded as in Python;
    `interval(low, high)` -> floats in [low, high], integers if both ends are int (`int(interval(1, 8))`);
    `tag(log, ...)` on a range or interval samples on a log scale."""
    sweep = override.value()
    log_scale = "log" in sweep.tags
    if isinstance(sweep, ChoiceSweep):
        if log_scale:
            raise ValueError(f"{override.input_line}: `log` applies to interval() and range(), not to choices")
        return CategoricalDistribution([_choice(v) for v in sweep.list])
    if isinstance(sweep, RangeSweep):
        start, stop, step = sweep.start, sweep.stop, sweep.step
        if all(isinstance(v, int) for v in (start, stop, step)):
            values = list(range(start, stop, step))
            if not values:
                raise ValueError(f"{override.input_line}: empty range")
            return IntDistribution(values[0], values[-1], log=log_scale, step=1 if log_scale else step)
        values = [float(v) for v in sweep.range()]
        if not values:
            raise ValueError(f"{override.input_line}: empty range")
        return FloatDistribution(values[0], values[-1], log=log_scale, step=None if log_scale else float(step))
    if isinstance(sweep, IntervalSweep):
        low, high = _number(sweep.start), _number(sweep.end)
        if isinstance(low, int) and isinstance(high, int):
            return IntDistribution(low, high, log=log_scale)
        return FloatDistribution(float(low), float(high), log=log_scale)
    raise ValueError(f"{override.input_line}: not a search space the Optuna sweeper understands")


def _choice(value: Any) -> Any:
    """Categorical choices must be None, bool, int, float or str (what Optuna can store)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def search_space(params: Dict[str, str], arguments: Sequence[str], parser: OverridesParser
                 ) -> Tuple[Dict[str, BaseDistribution], List[str]]:
    """The dimensions (hydra.sweeper.params, then sweep overrides on the command line, which win for the same key)
    and the overrides every trial gets unchanged (plain values, in either place)."""
    overrides: Dict[str, Override] = {}
    for override in parser.parse_overrides([f"{key}={value}" for key, value in params.items()]):
        overrides[override.get_key_element()] = override
    for override in parser.parse_overrides(list(arguments)):
        overrides.pop(override.get_key_element(), None)  # re-inserted: the command line's order comes last
        overrides[override.get_key_element()] = override
    space: Dict[str, BaseDistribution] = {}
    fixed: List[str] = []
    for key, override in overrides.items():
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed.append(override.input_line)
    return space, fixed


def make_sampler(cfg: Dict[str, Any]) -> optuna.samplers.BaseSampler:
    name = str(cfg.get("name") or "tpe").lower()
    seed = cfg.get("seed")
    if name == "tpe":
        kwargs = {} if cfg.get("n_startup_trials") is None else {"n_startup_trials": int(cfg["n_startup_trials"])}
        return optuna.samplers.TPESampler(seed=seed, **kwargs)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"hydra.sweeper.sampler.name: tpe or random, not {name!r}")


def _override_value(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)  # round-trips exactly, and Hydra parses 1e-05 / inf as floats
    if value is None:
        return "null"
    return str(value)


def _job_value(result: JobReturn) -> Tuple[TrialState, float | None, str]:
    if result.status != JobStatus.COMPLETED:
        return TrialState.FAIL, None, f"job raised {type(result._return_value).__name__}: {result._return_value}"
    value = result.return_value
    try:
        value = float(value)
    except (TypeError, ValueError):
        return TrialState.FAIL, None, f"job returned {value!r}, not a number"
    if math.isnan(value):
        return TrialState.FAIL, None, "job returned NaN"
    return TrialState.COMPLETE, value, ""


def run_study(sweeper, arguments: List[str]) -> List[Sequence[JobReturn]]:
    config = sweeper.config
    assert config is not None and sweeper.launcher is not None and sweeper.hydra_context is not None
    parser = OverridesParser.create(config_loader=sweeper.hydra_context.config_loader)
    space, fixed = search_space(sweeper.params, arguments, parser)
    if not space:
        raise ValueError("the Optuna sweeper has nothing to search: give hydra.sweeper.params (or a sweep override)")

    sweep_dir = Path(config.hydra.sweep.dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(config, sweep_dir / "multirun.yaml")

    study = optuna.create_study(study_name=sweeper.study_name, storage=sweeper.storage,
                                sampler=make_sampler(sweeper.sampler), direction=sweeper.direction,
                                load_if_exists=True)
    log.info(f"Optuna study {study.study_name!r}: {sweeper.n_trials} trial(s), {sweeper.direction}, "
             f"{type(study.sampler).__name__}, batches of {sweeper.n_jobs}")
    for name, dist in space.items():
        log.info(f"\t{name}: {dist}")

    returns: List[Sequence[JobReturn]] = []
    trial_jobs: Dict[int, int] = {}  # trial number -> Hydra job number (the job's folder in the sweep dir)
    job_idx = 0
    remaining = sweeper.n_trials
    while remaining > 0:
        trials = [study.ask(fixed_distributions=space) for _ in range(min(sweeper.n_jobs, remaining))]
        batch = [fixed + [f"{k}={_override_value(v)}" for k, v in t.params.items()] for t in trials]
        sweeper.validate_batch_is_legal(batch)
        results = sweeper.launcher.launch(batch, initial_job_idx=job_idx)
        for num, (trial, result) in enumerate(zip(trials, results)):
            state, value, why = _job_value(result)
            if state == TrialState.COMPLETE:
                study.tell(trial, value)
            else:
                log.warning(f"trial {trial.number} (job {job_idx + num}) failed: {why}")
                study.tell(trial, state=TrialState.FAIL)
            trial_jobs[trial.number] = job_idx + num
        job_idx += len(batch)
        remaining -= len(batch)
        returns.append(results)

    write_results(study, trial_jobs, sweep_dir / RESULTS_FILE)
    return returns


def write_results(study: "optuna.Study", trial_jobs: Dict[int, int], path: Path) -> None:
    """optimization_results.yaml: the best trial, and every trial of this sweep with its job number."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.number in trial_jobs]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = (min if study.direction == optuna.study.StudyDirection.MINIMIZE else max)(
        complete, key=lambda t: t.value) if complete else None
    results = {
        "name": "ftrun_optuna",
        "study_name": study.study_name,
        "direction": study.direction.name.lower(),
        "n_trials": len(trials),
        "best_job": trial_jobs[best.number] if best else None,
        "best_params": dict(best.params) if best else None,
        "best_value": best.value if best else None,
        "trials": [{"number": t.number, "job": trial_jobs[t.number], "state": t.state.name, "value": t.value,
                    "params": dict(t.params)} for t in trials],
    }
    OmegaConf.save(OmegaConf.create(results), path)
    log.info(f"Best of this sweep: job {results['best_job']} {results['best_params']} -> {results['best_value']}")
