"""Config → azure-ai-ml entities, exactly as the notebook builds them (and nothing is sent from here).

AmlCompute for the cluster, the pipeline job from `chat_completion_pipeline` with the @pipeline DSL, the Model
registered from the job's `trained_model` output, the ManagedOnlineEndpoint and its ManagedOnlineDeployment.
"""

from typing import Any, Dict, Mapping, Optional

from runner.azureml.spec import ASSET_TYPES, ComponentSpec

NODE_NAME = "chat_completion_pipeline"  # the notebook's variable name, which the DSL makes the node's name
# compute.tier takes the SDK's own values ("dedicated", "low_priority"): AmlCompute serialises "LowPriority" to
# vm_priority "Lowpriority" and its schema refuses it.


def build_compute(compute_cfg: Any, tier: str):
    from azure.ai.ml.entities import AmlCompute

    return AmlCompute(
        name=compute_cfg.name,
        size=compute_cfg.size,
        tier=tier,
        min_instances=compute_cfg.min_instances,
        max_instances=compute_cfg.max_instances,
        idle_time_before_scale_down=compute_cfg.idle_time_before_scale_down,
    )


def file_input(path: str, type: str = "uri_file"):
    from azure.ai.ml import Input

    return Input(type=type, path=str(path))


def pipeline_inputs(
    *,
    model_id: str,
    cluster: str,
    train_file: str,
    test_file: str,
    gpus_per_node: int,
    finetune_inputs: Mapping[str, Any],
    spec: ComponentSpec,
) -> Dict[str, Any]:
    """The keyword arguments of the component call, in the notebook's order, then the fine-tune parameters."""
    kwargs: Dict[str, Any] = {
        "mlflow_model_path": model_id,
        "compute_model_import": cluster,
        "compute_preprocess": cluster,
        "compute_finetune": cluster,
        "compute_model_evaluation": cluster,
        "train_file_path": file_input(train_file),
        "test_file_path": file_input(test_file),
        "number_of_gpu_to_use_finetuning": gpus_per_node,
    }
    for key, value in finetune_inputs.items():
        decl = spec.inputs.get(key)
        if decl is not None and decl.type in ASSET_TYPES:  # e.g. finetune.deepspeed: a local JSON file
            value = file_input(value, decl.type)
        kwargs[key] = value
    return kwargs


def build_pipeline_job(
    component: Any,
    kwargs: Mapping[str, Any],
    *,
    display_name: str,
    force_rerun: bool,
    continue_on_step_failure: bool,
    experiment_name: Optional[str] = None,
):
    """The notebook's create_pipeline(): one node of the component, its mlflow_model_folder as `trained_model`.

    Calling the component raises UnexpectedKeywordError for any keyword it does not declare.
    """
    from azure.ai.ml.dsl import pipeline

    @pipeline(name=display_name)
    def create_pipeline():
        chat_completion_pipeline = component(**kwargs)
        return {"trained_model": chat_completion_pipeline.outputs.mlflow_model_folder}

    job = create_pipeline()
    job.settings.force_rerun = force_rerun
    job.settings.continue_on_step_failure = continue_on_step_failure
    if experiment_name:
        job.experiment_name = experiment_name
    return job


def trained_model_path(job_name: str) -> str:
    return f"azureml://jobs/{job_name}/outputs/trained_model"


def build_model(*, job_name: str, name: str, version: str, base_model_name: str):
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import Model

    return Model(
        path=trained_model_path(job_name),
        type=AssetTypes.MLFLOW_MODEL,
        name=name,
        version=version,
        description=f"{base_model_name} fine tuned model for ultrachat 200k chat-completion",
    )


def build_endpoint(*, name: str, registered_model_name: str, auth_mode: str, traffic: Optional[Dict] = None):
    from azure.ai.ml.entities import ManagedOnlineEndpoint

    endpoint = ManagedOnlineEndpoint(
        name=name,
        description=f"Online endpoint for {registered_model_name}, fine tuned model for ultrachat-200k-chat-completion",
        auth_mode=auth_mode,
    )
    if traffic is not None:
        endpoint.traffic = dict(traffic)
    return endpoint


def build_deployment(deployment_cfg: Any, *, endpoint_name: str, model_id: str):
    from azure.ai.ml.entities import ManagedOnlineDeployment, OnlineRequestSettings, ProbeSettings

    return ManagedOnlineDeployment(
        name=deployment_cfg.deployment_name,
        endpoint_name=endpoint_name,
        model=model_id,
        instance_type=deployment_cfg.instance_type,
        instance_count=deployment_cfg.instance_count,
        liveness_probe=ProbeSettings(initial_delay=deployment_cfg.liveness_initial_delay),
        request_settings=OnlineRequestSettings(request_timeout_ms=deployment_cfg.request_timeout_ms),
    )
