"""The Hydra Sweeper class. The search itself is in _impl.py, which Hydra's plugin scan skips (leading underscore),
so Optuna is imported only when a sweep runs, not on every `ftrun` start."""

from typing import Any, Dict, List, Optional

from omegaconf import DictConfig

from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction


class FtrunOptunaSweeper(Sweeper):
    def __init__(self, direction: str, n_trials: int, n_jobs: int, study_name: Optional[str] = None,
                 storage: Optional[str] = None, sampler: Optional[Any] = None,
                 params: Optional[Dict[str, str]] = None) -> None:
        super().__init__()
        if direction not in ("minimize", "maximize"):
            raise ValueError(f"hydra.sweeper.direction: minimize or maximize, not {direction!r}")
        if int(n_trials) < 1 or int(n_jobs) < 1:
            raise ValueError(f"hydra.sweeper: n_trials and n_jobs must be >= 1 (got {n_trials}, {n_jobs})")
        self.direction = direction
        self.n_trials = int(n_trials)
        self.n_jobs = int(n_jobs)
        self.study_name = study_name
        self.storage = storage
        self.sampler = dict(sampler or {})
        self.params = {str(k): str(v) for k, v in (params or {}).items()}
        self.hydra_context: Optional[HydraContext] = None
        self.config: Optional[DictConfig] = None
        self.launcher: Optional[Launcher] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        from hydra_plugins.ftrun_optuna_sweeper._impl import run_study

        return run_study(self, arguments)
