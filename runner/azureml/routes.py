"""Which Azure route fine-tunes and serves a run, and what each route takes. Config only: no azure import.

Three routes, side by side (README, "Azure ML: three routes"):

    finetune.route   compute.kind    deployment.kind          what Azure runs
    pipeline         azure           managed_online           chat_completion_pipeline on your cluster (the notebook)
    finetuning_job   azure           managed_online           a `type: finetuning` job on your cluster, or on the
                     (instance_types)                          VM sizes in compute.instance_types
    finetuning_job   serverless      serverless               a `type: finetuning` job on Azure's own capacity, the
                                                              model served by a ServerlessEndpoint (pay per token)

The facts below are Azure's, copied here so that a run is refused before anything is spent.
"""

from typing import Any, Dict, Iterable, List, Mapping, Tuple

from runner.schema import ConfigError

# Serverless ("models as a service") fine-tuning of the azureml registry's Phi models covers these (Azure AI
# Foundry's serverless fine-tuning list; Microsoft models need no marketplace subscription). Phi-3-mini-4k-instruct
# and Phi-3.5-mini-instruct fine-tune on managed compute only.
SERVERLESS_FINETUNE_MODELS = ("Phi-4", "Phi-4-mini-instruct", "Phi-4-multimodal-instruct")
# Of those, the ones Azure's published serverless fine-tuning table does not list (an audit against it, issue 27):
# kept as a stand-in, said in the plan's warnings, since the service may refuse the job.
SERVERLESS_UNLISTED = ("Phi-4",)

# The hyperparameters a `type: finetuning` job documents (azureml-examples' finetuning jobs, CLI and SDK, serverless
# and managed compute, all pass exactly these), each a string ("Not a valid string." otherwise). Other finetune keys
# are pipeline-component inputs the job does not take.
FINETUNING_JOB_HYPERPARAMETERS = ("num_train_epochs", "per_device_train_batch_size", "learning_rate")


def is_finetuning_job(cfg: Any) -> bool:
    return cfg.backend.name == "azureml" and cfg.finetune.route == "finetuning_job"


def is_serverless_compute(cfg: Any) -> bool:
    return cfg.compute.kind == "serverless"


def is_serverless_endpoint(cfg: Any) -> bool:
    return cfg.deployment.kind == "serverless"


def route_errors(cfg: Any) -> List[str]:
    """The combinations of route, compute and deployment that Azure does not offer, each with what would work."""
    if cfg.backend.name != "azureml":
        if cfg.finetune.route != "pipeline":
            return [f"finetune.route={cfg.finetune.route} is an Azure ML route; backend={cfg.backend.name} trains "
                    f"on this machine (finetune.route=pipeline, or backend=azureml)"]
        return []
    from runner.azureml.retired_skus import retired_sku_errors

    errors = retired_sku_errors(cfg)
    route, model = cfg.finetune.route, cfg.model.name
    if route == "pipeline":
        if is_serverless_compute(cfg):
            errors.append("compute=serverless needs finetune.route=finetuning_job: the chat_completion_pipeline "
                          "component runs on a cluster of yours (compute=<a cluster preset>)")
        if is_serverless_endpoint(cfg):
            errors.append("deployment=serverless serves models fine-tuned serverless: set finetune.route="
                          "finetuning_job compute=serverless, or deploy the pipeline's model with deployment=azure")
        return errors
    if is_serverless_compute(cfg):
        if model not in SERVERLESS_FINETUNE_MODELS:
            errors.append(
                f"model {model} cannot be fine-tuned serverless (finetune.route=finetuning_job with no compute): "
                f"serverless fine-tuning covers {', '.join(SERVERLESS_FINETUNE_MODELS)} (e.g. "
                f"model=phi4_mini_instruct, or experiment=phi4_mini_serverless); {model} fine-tunes on managed "
                f"compute: compute=<a cluster preset in its allow list>, or compute.instance_types=[...]")
        if cfg.compute.instance_types:
            errors.append(f"compute.instance_types={list(cfg.compute.instance_types)} with compute=serverless: "
                          f"instance types are managed compute; pick a cluster preset or leave them out")
    elif is_serverless_endpoint(cfg):
        errors.append("deployment=serverless serves models fine-tuned serverless (compute=serverless); a model "
                      "fine-tuned on your cluster is served by a managed online endpoint: deployment=azure")
    return errors


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
