"""`ftrun`: the Hydra app. Composes conf/ into one validated config and hands it to the workflow.

Only hydra/omegaconf are imported at module level: heavy libraries load inside the steps that use them.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from runner.schema import register_configs

register_configs()

# conf/ sits beside the package (editable install); an absolute path keeps Hydra from looking for a `conf` module.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from runner.schema import ConfigError
    from runner.workflow import run

    hc = HydraConfig.get()
    try:
        record = run(cfg, run_dir=hc.runtime.output_dir, task_overrides=list(hc.overrides.task))
    except ConfigError as exc:
        # A config problem is the user's to fix: say what and where, without a traceback.
        print(f"ftrun: {exc}", file=sys.stderr)
        if hc.mode is not None and hc.mode.name == "MULTIRUN":
            raise
        sys.exit(2)
    return record.objective()


if __name__ == "__main__":
    main()
