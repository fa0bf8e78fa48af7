"""Known-harmless third-party noise, silenced where it starts: each filter names one message and says why it is
harmless, so a new warning from the same library still shows."""

import logging
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_lora() -> None:
    """PEFT asks every model `is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning on
    each LoRA job; the runner does not use that property."""
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def quiet_mlflow() -> None:
    """MLflow's store setup logs its schema migrations at INFO (MLflow's own lines and alembic's, one set per new
    store, so one per sweep job); the transformers flavour warns that a locally built model has no licence on the
    Hub. None of it is actionable here."""
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    flavour = logging.getLogger("mlflow.transformers")
    if not any(isinstance(f, _DropMessages) for f in flavour.filters):
        flavour.addFilter(_DropMessages("Unable to find license information"))


@contextmanager
def third_party_bars_off() -> Iterator[None]:
    """One progress display per step: the runner's own. transformers draws "Loading weights" at every
    from_pretrained and "Writing model shards" at every save, huggingface_hub its download bars and MLflow its
    artifact bars, each between the runner's own lines. Off while the steps run, back as they were afterwards.

    huggingface_hub's switch is the global one transformers copies when it is first imported, so a step that
    imports transformers later starts with its bars off too; importing it costs milliseconds (no torch)."""
    from huggingface_hub import utils as hub_utils

    hub_was_on = not hub_utils.are_progress_bars_disabled()
    tf_logging = _loaded("transformers.utils.logging")
    tf_was_on = tf_logging.is_progress_bar_enabled() if tf_logging is not None else True
    mlflow_env = os.environ.get(MLFLOW_BARS_ENV)
    hub_utils.disable_progress_bars()
    if tf_logging is not None:
        tf_logging.disable_progress_bar()
    os.environ[MLFLOW_BARS_ENV] = "false"  # read by MLflow at each artifact transfer
    try:
        yield
    finally:
        if hub_was_on:
            hub_utils.enable_progress_bars()
        tf_logging = _loaded("transformers.utils.logging")  # may have been imported by a step meanwhile
        if tf_logging is not None and tf_was_on:
            tf_logging.enable_progress_bar()
        if mlflow_env is None:
            os.environ.pop(MLFLOW_BARS_ENV, None)
        else:
            os.environ[MLFLOW_BARS_ENV] = mlflow_env


MLFLOW_BARS_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def _loaded(module: str):
    return sys.modules.get(module)
