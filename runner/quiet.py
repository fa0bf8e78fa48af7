"""Known-harmless third-party noise, silenced where it starts: each filter names one message and says why it is
harmless, so a new warning from the same library still shows."""

import logging
import warnings


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
