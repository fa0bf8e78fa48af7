"""What the finetuning-job route takes: its hyperparameters as the strings Azure takes, and its display name.
(Which route a config chooses, and the combinations Azure offers: runner/azure_routes.py.)
"""

from typing import Any, Dict, Iterable, List, Mapping, Tuple

from runner.errors import ConfigError

# The hyperparameters a `type: finetuning` job documents (azureml-examples' finetuning jobs, CLI and SDK, serverless
# and managed compute, all pass exactly these), each a string ("Not a valid string." otherwise). Other finetune keys
# are pipeline-component inputs the job does not take.
FINETUNING_JOB_HYPERPARAMETERS = ("num_train_epochs", "per_device_train_batch_size", "learning_rate")


def hyperparameters(params: Mapping[str, Any], explicit_keys: Iterable[str]) -> Tuple[Dict[str, str], List[str]]:
    """The finetune params a `type: finetuning` job takes, as the strings it takes, and a note for each other key
    that this run sets away from the schema's default (it is not sent). An explicit command-line key the job does
    not take is refused before anything is spent (check_hyperparameter_keys)."""
    import dataclasses

    from runner.schema import RUNNER_FINETUNE_KEYS, FinetuneConfig

    check_hyperparameter_keys(explicit_keys)
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.name not in RUNNER_FINETUNE_KEYS}
    sent = {key: as_string(params[key]) for key in FINETUNING_JOB_HYPERPARAMETERS if params.get(key) is not None}
    notes = [f"finetune.{key}={value!r} not sent: a finetuning job takes {', '.join(FINETUNING_JOB_HYPERPARAMETERS)}"
             for key, value in params.items()
             if key not in FINETUNING_JOB_HYPERPARAMETERS and key in defaults and value != defaults[key]]
    return sent, notes


def check_hyperparameter_keys(explicit_keys: Iterable[str]) -> None:
    from runner.schema import RUNNER_FINETUNE_KEYS

    unknown = sorted(k for k in explicit_keys if k not in FINETUNING_JOB_HYPERPARAMETERS
                     and k not in RUNNER_FINETUNE_KEYS and not k.startswith("local."))
    if unknown:
        raise ConfigError(
            f"finetune.route=finetuning_job takes the hyperparameters {', '.join(FINETUNING_JOB_HYPERPARAMETERS)}; "
            f"{', '.join('finetune.' + k for k in unknown)} would not be sent. Leave them out, or use "
            f"finetune.route=pipeline (the chat_completion_pipeline component takes every finetune key)")


def as_string(value: Any) -> str:
    """A job hyperparameter: "true"/"false" for flags, numbers in positional notation ("0.00002", as Azure's own
    samples write them: "2e-05" reads as a float to a YAML 1.2 reader, which the job refuses), text as is."""
    from decimal import Decimal

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(Decimal(repr(value)).normalize(), "f")
    return str(value)


def display_name(model_name: str, dataset_slug: str, sent: Mapping[str, str]) -> str:
    """The job's display name: the model, the data and the hyperparameters it was given."""
    short = {"num_train_epochs": "ep", "per_device_train_batch_size": "bs", "learning_rate": "lr"}
    parts = [f"{short[k]}{sent[k]}" for k in FINETUNING_JOB_HYPERPARAMETERS if k in sent]
    return "-".join([model_name, dataset_slug.replace("_", "-"), "finetuning", *parts])
