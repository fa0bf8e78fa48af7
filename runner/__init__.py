"""chat-finetune-runner: a declarative workflow runner for fine-tuning and serving chat models.

Kept import-free on purpose: `ftrun --help`, `--cfg job` and dry runs must not pay for torch, transformers or mlflow.
"""

__version__ = "0.1.0"
