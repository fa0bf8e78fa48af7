"""The sweeper's config schema, registered as `hydra/sweeper=ftrun_optuna`.

Imported by Hydra's plugin scan on every start, so it imports nothing heavier than Hydra (Optuna loads only when a
sweep runs).
"""

from dataclasses import dataclass, field
from typing import Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class SamplerConfig:
    # tpe: optuna.samplers.TPESampler; random: optuna.samplers.RandomSampler
    name: str = "tpe"
    seed: Optional[int] = None
    # TPE only: trials sampled at random before TPE models the results (None: Optuna's default, 10)
    n_startup_trials: Optional[int] = None


@dataclass
class FtrunOptunaSweeperConfig:
    _target_: str = "hydra_plugins.ftrun_optuna_sweeper.sweeper.FtrunOptunaSweeper"
    # minimize or maximize: what the jobs' return value (the sweep metric) should do
    direction: str = "minimize"
    # how many trials this sweep runs (with a storage holding the study already, this many more)
    n_trials: int = 20
    # trials asked for and launched together, as one batch of the Hydra launcher
    n_jobs: int = 1
    # None: an in-memory study; e.g. sqlite:///optuna.db keeps it, so that a later sweep continues it
    study_name: Optional[str] = None
    storage: Optional[str] = None
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    # key: search space in Hydra's override grammar, e.g. `tag(log, interval(1e-4, 1e-2))`, `choice(4, 8, 16)`,
    # `range(1, 5)`, `int(interval(1, 8))`; a plain value is passed to every trial unchanged
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="ftrun_optuna", node=FtrunOptunaSweeperConfig,
                             provider="ftrun_optuna_sweeper")
