"""Which Azure route a config chooses and which combinations of route, compute and deployment Azure offers.
Config only (no azure import), below the schema's validate() and the azureml backend, which both ask it.

Three routes, side by side (README, "Azure ML: three routes"):

    finetune.route   compute.kind    deployment.kind          what Azure runs
    pipeline         azure           managed_online           chat_completion_pipeline on your cluster (the notebook)
    finetuning_job   azure           managed_online           a `type: finetuning` job on your cluster, or on the
                     (instance_types)                          VM sizes in compute.instance_types
    finetuning_job   serverless      serverless               a `type: finetuning` job on Azure's own capacity, the
                                                              model served by a ServerlessEndpoint (pay per token)

The facts below are Azure's, copied here so that a run is refused before anything is spent.
"""

from typing import Any, List

from runner.retired_skus import retired_sku_errors

# Serverless ("models as a service") fine-tuning of the azureml registry's Phi models covers these (Azure AI
# Foundry's serverless fine-tuning list; Microsoft models need no marketplace subscription). Phi-3-mini-4k-instruct
# and Phi-3.5-mini-instruct fine-tune on managed compute only.
SERVERLESS_FINETUNE_MODELS = ("Phi-4", "Phi-4-mini-instruct", "Phi-4-multimodal-instruct")
# Of those, the ones Azure's published serverless fine-tuning table does not list (an audit against it, issue 27):
# kept as a stand-in, said in the plan's warnings, since the service may refuse the job.
SERVERLESS_UNLISTED = ("Phi-4",)


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
