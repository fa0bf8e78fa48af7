"""Where things are: the checkout (runner/ and conf/ side by side) and the one state root."""

import os
from pathlib import Path

# The checkout that holds runner/ and conf/ (the install is editable: conf/ lives beside the package).
CHECKOUT = Path(__file__).resolve().parent.parent
STATE_ENV = "FTRUN_HOME"


def state_root() -> str:
    """Where all state lives (MLflow store, models, data, endpoints): $FTRUN_HOME if set, else `.ftrun/` in the
    checkout. Always absolute, so `ftrun` started from another directory (or `from_run=` pointing back) finds the
    same store, models and data instead of starting a second `.ftrun/` wherever it happens to be run."""
    value = os.environ.get(STATE_ENV)
    root = Path(value).expanduser() if value else CHECKOUT / ".ftrun"
    return str(root.resolve())


