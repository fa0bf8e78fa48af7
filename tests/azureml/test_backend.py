"""The Azure ML backend against a call-recording double of the workspace and registry clients.

The notebook's run (experiment=phi3_ultrachat) must make the notebook's calls, in the notebook's order, with the
notebook's arguments; every refusal (failed cluster, size outside the allow list, archived model, unknown explicit
key, no login, no workspace) must happen before anything is created or submitted.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from runner.azureml.backend import AzureMLBackend
from runner.azureml.checks import AzureStepError
from runner.azureml.clients import MANAGEMENT_SCOPE, AzureLoginError, WorkspaceNotConfigured
from runner.finetune_params import explicit_finetune_keys
from runner.record import RunRecord
from runner.schema import ConfigError
from runner.workflow import StepContext
from tests.azureml.double import PIPELINE_SPEC, AzureWorld, keep_lists_only_in, rest_body
from tests.conftest import compose_cfg

TIMESTAMP = 1767225600  # pinned clock: model version and endpoint name
DISPLAY_NAME = "Phi-3-mini-4k-instruct-ultrachat-bs8-cosine-ds2-lora-save_limit1-seqlen-1"
WS_IDS = ["backend.subscription_id=sub-0000", "backend.resource_group=rg-demo", "backend.workspace_name=ws-demo"]


def notebook_cfg(tmp_path, *overrides, ids=True):
    base = ["experiment=phi3_ultrachat", "model.allow_archived=true",
            f"backend.config_path={tmp_path / 'no-config.json'}"]
    return compose_cfg(base + (WS_IDS if ids else []) + list(overrides))


def write_data(tmp_path) -> dict:
    row = {"prompt": "Hi", "prompt_id": "1", "messages": [{"role": "user", "content": "Hi"},
                                                          {"role": "assistant", "content": "Hello!"}]}
    files = {}
    for split in ("train_sft", "test_sft", "test_gen"):
        p = tmp_path / "data" / f"{split}.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
        files[split] = str(p)
    return {"train_file": files["train_sft"], "test_file": files["test_sft"], "sample_file": files["test_gen"]}


def make_ctx(cfg, tmp_path, overrides=()):
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    record = RunRecord(run_dir, backend="azureml", config_sha256="x")
    return StepContext(cfg=cfg, run_dir=run_dir, record=record,
                       explicit_finetune_keys=explicit_finetune_keys(overrides), task_overrides=list(overrides))


def run_steps(backend, ctx, data, steps=("connect", "model", "compute", "data", "finetune", "metrics", "register",
                                          "deploy", "test", "cleanup")):
    """The workflow's loop, step by step, with the record kept as the workflow keeps it."""
    request_file = ctx.run_dir / "sample_score.json"
    request_file.write_text(json.dumps({"input_data": {"input_string": [[{"role": "user", "content": "Hi"}]],
                                                       "parameters": {}}, "params": {}}))
    for name in steps:
        ctx.record.start(name)
        if name == "data":
            out = {**data, **backend.data(ctx, data)}
        elif name == "test":
            out = backend.test(ctx, request_file)
        else:
            out = getattr(backend, name)(ctx)
        ctx.record.finish(name, out)
    return ctx.record


@pytest.fixture
def mlflow_job(tmp_path, monkeypatch):
    """A local MLflow store holding a pipeline run (id = the job name) with a grandchild that logged the losses,
    as an Azure ML pipeline job nests its steps; the double's workspace answers with its URI."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("chat_completion_Phi-3-mini-4k-instruct")
    parent = client.create_run(exp)
    node = client.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id})
    finetune = client.create_run(exp, tags={"mlflow.parentRunId": node.info.run_id})
    metrics = [Metric("loss", 2.0 - 0.2 * i, 0, 10 * i) for i in range(5)]
    metrics += [Metric("eval_loss", 1.9, 0, 20), Metric("eval_loss", 1.4, 0, 40)]
    metrics += [Metric("learning_rate", 5e-6, 0, 10 * i) for i in range(5)]
    client.log_batch(finetune.info.run_id, metrics=metrics)
    return uri, parent.info.run_id


def node_inputs(job) -> dict:
    inputs = job._to_dict()["jobs"]["chat_completion_pipeline"]["inputs"]
    def plain(v):
        if not isinstance(v, dict):
            return v
        path = v["path"]  # the DSL dump shows local files as `azureml:<path>`; asset ids keep their scheme
        return path if path.startswith("azureml://") else path.removeprefix("azureml:")

    return {k: plain(v) for k, v in inputs.items()}


# ---- the notebook's run -------------------------------------------------------------------------------------


def test_notebook_run_makes_the_notebooks_calls_in_order(tmp_path, mlflow_job, capsys):
    uri, job_name = mlflow_job
    world = AzureWorld(job_name=job_name, tracking_uri=uri)
    cfg = notebook_cfg(tmp_path)
    backend = AzureMLBackend(cfg, clients=world.clients(), clock=lambda: TIMESTAMP)
    ctx = make_ctx(cfg, tmp_path)
    data = write_data(tmp_path)
    record = run_steps(backend, ctx, data)

    assert world.names() == [
        "DefaultAzureCredential", "DefaultAzureCredential.get_token",
        "MLClient", "MLClient",                                        # workspace, then registry
        "registry.models.get",
        "workspace.compute.get",                                       # not found → create dedicated
        "workspace.begin_create_or_update", "workspace.begin_create_or_update.result",
        "workspace.compute.get", "workspace.compute.list_sizes",
        "registry.components.get",
        "workspace.jobs.create_or_update", "workspace.jobs.stream",
        "workspace.workspaces.get",                                    # MLflow tracking URI for the metrics
        "workspace.models.create_or_update",
        "workspace.begin_create_or_update", "workspace.begin_create_or_update.result",          # endpoint
        "workspace.online_deployments.begin_create_or_update", "workspace.online_deployments.begin_create_or_update.result",
        "workspace.begin_create_or_update", "workspace.begin_create_or_update.result",        # traffic
        "workspace.online_endpoints.invoke",
        "workspace.online_endpoints.begin_delete", "workspace.online_endpoints.begin_delete.result",
    ]
    calls = world.calls
    assert calls[1].args == (MANAGEMENT_SCOPE,)
    assert calls[2].kwargs == dict(subscription_id="sub-0000", resource_group_name="rg-demo",
                                   workspace_name="ws-demo", registry_name=None)
    assert calls[3].kwargs["registry_name"] == "azureml" and calls[3].args == ("FakeCredential",)
    assert world.find("registry.models.get")[0][1:] == (("Phi-3-mini-4k-instruct",), {"label": "latest"})

    compute = world.created[0]
    assert type(compute).__name__ == "AmlCompute"
    assert (compute.name, compute.size, compute.tier, compute.max_instances) == (
        "gpu-cluster-big", "Standard_ND96asr_v4", "dedicated", 2)
    assert world.find("registry.components.get")[0].kwargs == {"name": "chat_completion_pipeline", "label": "latest"}

    submit = world.find("workspace.jobs.create_or_update")[0]
    job = submit.args[0]
    assert submit.kwargs == {"experiment_name": "chat_completion_Phi-3-mini-4k-instruct"}
    assert job.display_name == DISPLAY_NAME
    assert job.settings.force_rerun is True and job.settings.continue_on_step_failure is False
    assert list(job.jobs) == ["chat_completion_pipeline"]
    inputs = node_inputs(job)
    notebook_args = {
        "mlflow_model_path": "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/15",
        "compute_model_import": "gpu-cluster-big", "compute_preprocess": "gpu-cluster-big",
        "compute_finetune": "gpu-cluster-big", "compute_model_evaluation": "gpu-cluster-big",
        "train_file_path": data["train_file"], "test_file_path": data["test_file"],
        "number_of_gpu_to_use_finetuning": 8,
        # the notebook's training/optimization parameters after its update with the model's defaults
        # (num_train_epochs 3 → 1 and precision 16 come from model_specific_defaults)
        "num_train_epochs": 1, "per_device_train_batch_size": 1, "per_device_eval_batch_size": 1,
        "learning_rate": 5e-06, "lr_scheduler_type": "cosine", "apply_lora": "true", "apply_deepspeed": "true",
        "deepspeed_stage": "2", "apply_ort": "false", "precision": "16", "ignore_mismatched_sizes": "false",
        "gradient_accumulation_steps": 1, "logging_strategy": "steps", "logging_steps": 10, "save_total_limit": 1,
    }
    assert {k: inputs.get(k) for k in notebook_args} == notebook_args
    assert "learning_rate_min" not in inputs and "learning_rate_max" not in inputs  # the seed hazard
    assert job._to_dict()["outputs"]["trained_model"]["type"] == "mlflow_model"
    assert job._to_dict()["jobs"]["chat_completion_pipeline"]["outputs"] == {
        "mlflow_model_folder": "${{parent.outputs.trained_model}}"}
    assert world.find("workspace.jobs.stream")[0].args == (job_name,)

    model = world.find("workspace.models.create_or_update")[0].args[0]
    assert model.path == f"azureml://jobs/{job_name}/outputs/trained_model"
    assert (model.type, model.name, model.version) == ("mlflow_model", "Phi-3-mini-4k-instruct-ultrachat-200k",
                                                       str(TIMESTAMP))
    assert model.description == "Phi-3-mini-4k-instruct fine tuned model for ultrachat 200k chat-completion"

    endpoint = world.created[1]
    assert endpoint.name == f"ultrachat-completion-{TIMESTAMP}" and endpoint.auth_mode == "key"
    assert endpoint.description == ("Online endpoint for Phi-3-mini-4k-instruct-ultrachat-200k, fine tuned model "
                                    "for ultrachat-200k-chat-completion")
    deployment = world.find("workspace.online_deployments.begin_create_or_update")[0].args[0]
    registered_id = record.output("register", "model_id")
    assert registered_id.endswith(f"/models/Phi-3-mini-4k-instruct-ultrachat-200k/versions/{TIMESTAMP}")
    assert (deployment.name, deployment.endpoint_name, deployment.model, deployment.instance_type,
            deployment.instance_count) == ("demo", endpoint.name, registered_id, "Standard_NC24ads_A100_v4", 1)
    assert deployment.liveness_probe.initial_delay == 600
    assert deployment.request_settings.request_timeout_ms == 90000
    assert world.created[2] is endpoint and endpoint.traffic == {"demo": 100}
    invoke = world.find("workspace.online_endpoints.invoke")[0]
    assert invoke.kwargs == {"endpoint_name": endpoint.name, "deployment_name": "demo",
                             "request_file": str(ctx.run_dir / "sample_score.json")}
    assert world.find("workspace.online_endpoints.begin_delete")[0].kwargs == {"name": endpoint.name}

    # what the record keeps for later runs
    assert record.output("compute", "gpus_per_node") == 8
    assert record.output("finetune", "job_name") == job_name
    assert record.output("finetune", "display_name") == DISPLAY_NAME
    assert record.output("test", "reply") == "Hello from the endpoint"
    assert record.output("cleanup", "deleted") == endpoint.name
    # metrics: the grandchild run's losses, through MLflow, into the shared report
    metrics = record.output("metrics")
    assert metrics["final"]["train_loss"] == pytest.approx(1.2)
    assert metrics["final"]["eval_loss"] == pytest.approx(1.4)
    assert Path(metrics["plot"]).stat().st_size > 1000
    out = capsys.readouterr().out
    assert "eval_loss" in out and "raw response" in out
    # nothing that holds a secret is printed or recorded
    assert "SECRET-TOKEN-VALUE" not in out
    assert "SECRET-TOKEN-VALUE" not in ctx.record.path.read_text()


def test_config_json_is_preferred_and_its_ids_used(tmp_path):
    world = AzureWorld()
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps({"subscription_id": "s-json", "resource_group": "rg-json",
                                       "workspace_name": "ws-json"}))
    cfg = notebook_cfg(tmp_path, f"backend.config_path={config_json}", ids=False)
    backend = AzureMLBackend(cfg, clients=world.clients())
    out = backend.connect(make_ctx(cfg, tmp_path))
    assert world.names()[:4] == ["DefaultAzureCredential", "DefaultAzureCredential.get_token",
                                 "MLClient.from_config", "MLClient"]
    assert world.calls[2].kwargs == {"path": str(config_json)}
    assert out["workspace_name"] == "ws-json"


def test_existing_cluster_is_reused_and_gpus_filled_in(tmp_path):
    world = AzureWorld()
    world.computes["gpu-cluster-big"] = SimpleNamespace(size="STANDARD_ND96ASR_V4", provisioning_state="Succeeded")
    cfg = notebook_cfg(tmp_path, "compute.gpus_per_node=0", "steps=[connect,model,compute]")
    backend = AzureMLBackend(cfg, clients=world.clients())
    ctx = make_ctx(cfg, tmp_path)
    record = run_steps(backend, ctx, {}, steps=("connect", "model", "compute"))
    assert record.output("compute", "gpus_per_node") == 8  # from list_sizes, matched case-insensitively
    assert world.spending() == []


def test_low_priority_fallback_when_dedicated_fails(tmp_path):
    world = AzureWorld()
    world.failing_tiers = {"dedicated"}
    cfg = notebook_cfg(tmp_path, "steps=[connect,model,compute]")
    backend = AzureMLBackend(cfg, clients=world.clients())
    record = run_steps(backend, make_ctx(cfg, tmp_path), {}, steps=("connect", "model", "compute"))
    assert [c.tier for c in world.created] == ["low_priority"]
    assert world.names().count("workspace.begin_create_or_update") == 2
    assert record.output("compute", "created_tier") == "low_priority"


def test_no_cluster_can_be_created(tmp_path):
    world = AzureWorld()
    world.failing_tiers = {"dedicated", "low_priority"}
    cfg = notebook_cfg(tmp_path, "steps=[connect,model,compute]")
    backend = AzureMLBackend(cfg, clients=world.clients())
    with pytest.raises(AzureStepError, match="could not create compute cluster gpu-cluster-big.*low_priority"):
        run_steps(backend, make_ctx(cfg, tmp_path), {}, steps=("connect", "model", "compute"))


def test_wait_false_returns_after_submission(tmp_path):
    world = AzureWorld()
    world.job_status = "Running"
    cfg = notebook_cfg(tmp_path, "backend.wait=false")
    backend = AzureMLBackend(cfg, clients=world.clients())
    ctx = make_ctx(cfg, tmp_path)
    record = run_steps(backend, ctx, write_data(tmp_path), steps=("connect", "model", "compute", "data", "finetune"))
    assert "workspace.jobs.stream" not in world.names()
    assert record.output("finetune", "status") == "submitted"
    assert record.output("finetune", "studio_url") == "https://ml.azure.com/runs/sincere_kettle_42"
    with pytest.raises(AzureStepError, match="is Running, not Completed"):
        backend.register(ctx)
    assert "workspace.models.create_or_update" not in world.names()


def test_failed_deployment_deletes_the_endpoint(tmp_path):
    world = AzureWorld()
    cfg = notebook_cfg(tmp_path)
    backend = AzureMLBackend(cfg, clients=world.clients(), clock=lambda: TIMESTAMP)
    ctx = make_ctx(cfg, tmp_path)
    ctx.record.start("register")
    ctx.record.finish("register", {"model_id": "azureml:m:1", "name": "m"})
    world.poller_errors["workspace.online_deployments.begin_create_or_update"] = RuntimeError(
        "quota exceeded for Standard_NC24ads_A100_v4")
    with pytest.raises(RuntimeError, match="quota exceeded"):
        backend.deploy(ctx)
    assert world.find("workspace.online_endpoints.begin_delete")[0].kwargs == {"name": f"ultrachat-completion-{TIMESTAMP}"}


def test_cleanup_deletes_compute_only_when_asked(tmp_path):
    for delete, expected in ((False, None), (True, "gpu-cluster-big")):
        world = AzureWorld()
        cfg = notebook_cfg(tmp_path, f"cleanup.delete_compute={str(delete).lower()}", "endpoint_name=ep-1")
        out = AzureMLBackend(cfg, clients=world.clients()).cleanup(make_ctx(cfg, tmp_path))
        assert out == {"deleted": "ep-1", "compute_deleted": expected}
        assert ("workspace.compute.begin_delete" in world.names()) is delete


# ---- refusals before anything is spent ----------------------------------------------------------------------


def _run_until_failure(cfg, world, tmp_path, overrides=(), exc=ConfigError, match=None):
    backend = AzureMLBackend(cfg, clients=world.clients(), clock=lambda: TIMESTAMP)
    ctx = make_ctx(cfg, tmp_path, overrides)
    with pytest.raises(exc, match=match) as info:
        run_steps(backend, ctx, write_data(tmp_path))
    assert world.spending() == [], f"spent before refusing: {world.spending()}"
    return info.value


def test_failed_cluster_is_refused(tmp_path):
    world = AzureWorld()
    world.computes["gpu-cluster-big"] = SimpleNamespace(size="Standard_ND96asr_v4", provisioning_state="Failed")
    _run_until_failure(notebook_cfg(tmp_path), world, tmp_path, match="provisioning state 'failed'")


def test_size_outside_the_allow_list_is_refused_before_any_compute_call(tmp_path):
    world = AzureWorld()
    err = _run_until_failure(notebook_cfg(tmp_path, "compute=nd40rs_v2"), world, tmp_path,
                             match="compute.size=Standard_ND40rs_v2 is not in Phi-3-mini-4k-instruct's fine-tune")
    assert "Standard_ND96asr_v4" in str(err)
    assert not [n for n in world.names() if n.startswith("workspace.compute")]


def test_existing_cluster_of_a_disallowed_size_is_refused(tmp_path):
    world = AzureWorld()
    world.computes["gpu-cluster-big"] = SimpleNamespace(size="Standard_ND40rs_v2", provisioning_state="Succeeded")
    _run_until_failure(notebook_cfg(tmp_path), world, tmp_path, match="existing cluster gpu-cluster-big's size")


def test_k80_size_refused_when_the_model_has_no_allow_list(tmp_path, capsys):
    """No list in the registry model (tags, properties; the SDK drops system metadata) nor in the model preset."""
    world = AzureWorld()
    keep_lists_only_in(world.model_body)
    _run_until_failure(notebook_cfg(tmp_path, "compute.size=Standard_NC24", "compute.gpus_per_node=0",
                                    "model.finetune_compute_allow_list=[]", "model.inference_compute_allow_list=[]"),
                       world, tmp_path, match="K80")
    assert "fine-tune from none" in capsys.readouterr().out


def test_inference_size_outside_the_allow_list_is_refused(tmp_path):
    world = AzureWorld()
    _run_until_failure(notebook_cfg(tmp_path, "deployment.instance_type=Standard_D4s_v3"), world, tmp_path,
                       match="deployment.instance_type=Standard_D4s_v3 is not in .* inference compute allow list")


def test_archived_model_is_refused_with_date_and_replacement(tmp_path):
    world = AzureWorld()
    cfg = compose_cfg(["experiment=phi3_ultrachat", f"backend.config_path={tmp_path / 'none.json'}"] + WS_IDS)
    err = _run_until_failure(cfg, world, tmp_path, match="archived")
    assert "2025-08-30" in str(err) and "model=phi4" in str(err)
    assert "model.allow_archived=true" in str(err)
    assert world.names()[-1] == "registry.models.get"  # nothing after the model was looked at


def test_registry_stage_archived_is_recognised_without_the_config_flag(tmp_path):
    world = AzureWorld()
    world.model_body["properties"]["stage"] = "Archived"
    cfg = compose_cfg(["experiment=phi3_ultrachat", "model.archived=false", "model.finetune_retirement_date=null",
                       f"backend.config_path={tmp_path / 'none.json'}"] + WS_IDS)
    _run_until_failure(cfg, world, tmp_path, match="registry stage Archived")


def test_unknown_explicit_key_is_refused_before_login(tmp_path):
    """A component version without `max_steps`: the user's explicit finetune.max_steps is an error that names
    the nearest input; it is found against backend.component_spec before any login."""
    data = yaml.safe_load(PIPELINE_SPEC.read_text())
    del data["inputs"]["max_steps"]
    for job in data["jobs"].values():
        job.get("inputs", {}).pop("max_steps", None)
    trimmed = tmp_path / "spec_without_max_steps.yaml"
    trimmed.write_text(yaml.safe_dump(data, sort_keys=False))
    world = AzureWorld()
    overrides = ["finetune.max_steps=100"]
    cfg = notebook_cfg(tmp_path, f"backend.component_spec={trimmed}", *overrides)
    err = _run_until_failure(cfg, world, tmp_path, overrides, match="finetune.max_steps is not an input")
    assert "did you mean" in str(err)
    assert world.calls == []


def test_unknown_explicit_key_is_refused_against_the_live_component_before_submission(tmp_path):
    from azure.ai.ml import load_component

    data = yaml.safe_load(PIPELINE_SPEC.read_text())
    del data["inputs"]["max_steps"]
    for job in data["jobs"].values():
        job.get("inputs", {}).pop("max_steps", None)
    trimmed = tmp_path / "registry_component.yaml"
    trimmed.write_text(yaml.safe_dump(data, sort_keys=False))
    world = AzureWorld()
    world.component = load_component(source=str(trimmed))  # the registry's "latest" lacks the input
    overrides = ["finetune.max_steps=100"]
    cfg = notebook_cfg(tmp_path, "backend.component_spec=null", *overrides)
    backend = AzureMLBackend(cfg, clients=world.clients())
    with pytest.raises(ConfigError, match="finetune.max_steps is not an input"):
        run_steps(backend, make_ctx(cfg, tmp_path, overrides), write_data(tmp_path))
    assert "registry.components.get" in world.names()
    assert "workspace.jobs.create_or_update" not in world.names()


def test_gpus_per_node_must_agree_with_the_workspace(tmp_path):
    """list_sizes() comes after the cluster is made, in the notebook's order (an idle cluster scales to zero and
    costs nothing); the mismatch stops the run before the job is submitted."""
    world = AzureWorld()
    cfg = notebook_cfg(tmp_path, "compute.gpus_per_node=4")
    backend = AzureMLBackend(cfg, clients=world.clients())
    with pytest.raises(ConfigError, match="compute.gpus_per_node=4 but Standard_ND96asr_v4 has 8"):
        run_steps(backend, make_ctx(cfg, tmp_path), write_data(tmp_path))
    assert world.names()[-1] == "workspace.compute.list_sizes"
    assert "workspace.jobs.create_or_update" not in world.names()


# ---- login and workspace ------------------------------------------------------------------------------------


def test_no_login_under_ci_says_how_to_log_in(tmp_path):
    from azure.core.exceptions import ClientAuthenticationError

    world = AzureWorld()
    world.token_error = ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token")
    cfg = notebook_cfg(tmp_path)
    backend = AzureMLBackend(cfg, clients=world.clients(environ={"CI": "true"}))
    with pytest.raises(AzureLoginError) as info:
        run_steps(backend, make_ctx(cfg, tmp_path), {})
    text = str(info.value)
    assert "az login" in text and "AZURE_CLIENT_SECRET" in text and "CI environment variable" in text
    assert "InteractiveBrowserCredential" not in world.names() and "MLClient" not in world.names()


def test_interactive_false_also_disables_the_browser(tmp_path):
    from azure.core.exceptions import ClientAuthenticationError

    world = AzureWorld()
    world.token_error = ClientAuthenticationError("no token")
    cfg = notebook_cfg(tmp_path, "backend.interactive=false")
    with pytest.raises(AzureLoginError, match="backend.interactive=false"):
        AzureMLBackend(cfg, clients=world.clients()).connect(make_ctx(cfg, tmp_path))
    assert world.spending() == []


def test_interactive_login_is_the_fallback(tmp_path):
    from azure.core.exceptions import ClientAuthenticationError

    world = AzureWorld()
    world.token_error = ClientAuthenticationError("no token")
    cfg = notebook_cfg(tmp_path)
    out = AzureMLBackend(cfg, clients=world.clients()).connect(make_ctx(cfg, tmp_path))
    assert world.names()[:3] == ["DefaultAzureCredential", "DefaultAzureCredential.get_token",
                                 "InteractiveBrowserCredential"]
    assert out["credential"] == "FakeInteractive"


def test_missing_workspace_ids_name_keys_and_env_vars(tmp_path):
    world = AzureWorld()
    cfg = notebook_cfg(tmp_path, "backend.workspace_name=null", "backend.resource_group=null",
                       "backend.subscription_id=sub-1", ids=False)
    with pytest.raises(WorkspaceNotConfigured) as info:
        AzureMLBackend(cfg, clients=world.clients()).connect(make_ctx(cfg, tmp_path))
    text = str(info.value)
    for needle in ("backend.resource_group", "AZURE_RESOURCE_GROUP", "backend.workspace_name",
                   "AZUREML_WORKSPACE_NAME", "config.json"):
        assert needle in text
    assert "AZURE_SUBSCRIPTION_ID)" not in text  # the one that is set is not reported missing
    assert "MLClient" not in world.names()


# ---- the endpoint's reply -----------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    '{"output": "Paris"}', '[{"0": "Paris"}]', '{"0": "Paris"}', "Paris", '"Paris"', [{"0": "Paris"}],
    {"output": "Paris"}, b'{"output": "Paris"}',
])
def test_reply_shapes(raw):
    from runner.azureml.scoring import extract_reply

    assert extract_reply(raw) == "Paris"


def test_unexpected_reply_shape_is_an_error():
    from runner.azureml.scoring import UnexpectedResponse, extract_reply

    with pytest.raises(UnexpectedResponse, match="no 'output' or '0' key"):
        extract_reply('{"error": "bad input"}')


def test_pinned_model_and_component_versions(tmp_path):
    world = AzureWorld()
    cfg = notebook_cfg(tmp_path, "model.version=15", "backend.component_version=0.0.82")
    backend = AzureMLBackend(cfg, clients=world.clients())
    run_steps(backend, make_ctx(cfg, tmp_path), write_data(tmp_path),
              steps=("connect", "model", "compute", "data", "finetune"))
    assert world.find("registry.models.get")[0][1:] == (("Phi-3-mini-4k-instruct",), {"version": "15"})
    assert world.find("registry.components.get")[0].kwargs == {"name": "chat_completion_pipeline",
                                                               "version": "0.0.82"}


# ---- the allow lists where the real registry keeps them (models deserialized by azure-ai-ml) ----------------------


def test_lists_only_in_system_metadata_are_read_from_the_registrys_rest_body(tmp_path, capsys):
    """A current registry model keeps its SKU lists only in system metadata, which azure-ai-ml's Model entity drops:
    the runner reads them from the version's raw REST body (the SDK's own registry GET), with the preset's lists
    emptied so that only the registry's can refuse, and refuses compute=nd40rs_v2 before any compute call."""
    world = AzureWorld()
    world.model_body = keep_lists_only_in(rest_body("Phi-3-mini-4k-instruct"), "system_metadata")
    assert world.model.tags.get("finetune_compute_allow_list") is None and not world.model._system_metadata
    err = _run_until_failure(notebook_cfg(tmp_path, "compute=nd40rs_v2", "model.finetune_compute_allow_list=[]",
                                          "model.inference_compute_allow_list=[]"), world, tmp_path,
                             match="compute.size=Standard_ND40rs_v2 is not in Phi-3-mini-4k-instruct's fine-tune")
    assert "Standard_ND96asr_v4" in str(err)
    assert world.names()[-1] == "registry.models.get"
    assert [url.split("?")[0].split("/registries/")[1] for _, url in world.rest_requests] == [
        "azureml/models/Phi-3-mini-4k-instruct/versions/15"]
    assert not [n for n in world.names() if n.startswith("workspace.compute")]
    out = capsys.readouterr().out
    assert "fine-tune from registry REST body system metadata (SKU.finetuneRecommendedSkus)" in out


def test_an_unreadable_rest_body_falls_back_to_the_preset_and_says_so(tmp_path, capsys):
    from azure.core.exceptions import ServiceRequestError

    world = AzureWorld()
    world.model_body = keep_lists_only_in(rest_body("Phi-3-mini-4k-instruct"), "system_metadata")
    world.rest_error = ServiceRequestError("connection reset")
    _run_until_failure(notebook_cfg(tmp_path, "compute=nd40rs_v2"), world, tmp_path,
                       match="compute.size=Standard_ND40rs_v2 is not in Phi-3-mini-4k-instruct's fine-tune")
    out = capsys.readouterr().out
    assert "REST body of Phi-3-mini-4k-instruct could not be read (GET Phi-3-mini-4k-instruct/versions/15 failed " \
           "(ServiceRequestError: connection reset))" in out
    assert "fine-tune from model preset (model.finetune_compute_allow_list)" in out


@pytest.mark.parametrize("override, match", [
    ("compute=nd40rs_v2", "compute.size=Standard_ND40rs_v2 is not in Phi-4's fine-tune compute allow list"),
    ("deployment.instance_type=Standard_D2as_v4",
     "deployment.instance_type=Standard_D2as_v4 is not in Phi-4's inference compute allow list"),
])
def test_phi4_sizes_outside_its_lists_are_refused_in_a_real_run(tmp_path, override, match):
    """Phi-4's registry body holds its lists only in system metadata: before the fix, both sizes went through to
    cluster creation and deployment."""
    world = AzureWorld()
    world.model_body = rest_body("Phi-4")
    cfg = compose_cfg(["experiment=phi4_ultrachat", f"backend.config_path={tmp_path / 'none.json'}", *WS_IDS,
                       override])
    _run_until_failure(cfg, world, tmp_path, match=match)
    assert world.names()[-1] == "registry.models.get"


def test_lists_only_in_properties_are_read(tmp_path, capsys):
    """Older registry models keep the lists in properties (finetune-recommended-sku, comma-separated); with the
    preset's lists emptied, only the registry's can refuse the size."""
    world = AzureWorld()
    world.model_body = rest_body("Phi-3.5-mini-instruct")
    cfg = notebook_cfg(tmp_path, "model=phi35_mini_instruct", "compute=nd40rs_v2",
                       "model.finetune_compute_allow_list=[]", "model.inference_compute_allow_list=[]")
    _run_until_failure(cfg, world, tmp_path,
                       match="compute.size=Standard_ND40rs_v2 is not in Phi-3.5-mini-instruct's fine-tune")
    assert not [n for n in world.names() if n.startswith("workspace.compute")]
    out = capsys.readouterr().out
    assert ("allow lists of Phi-3.5-mini-instruct: fine-tune from registry properties (finetune-recommended-sku), "
            "4 sizes; inference from registry properties (inference-recommended-sku), 4 sizes") in out


def test_phi4_run_goes_through_with_the_registrys_lists(tmp_path, capsys):
    """experiment=phi4_ultrachat against Phi-4 as the registry serves it: every step, the registry's asset id in the
    job, and the source of the lists printed and recorded."""
    world = AzureWorld()
    world.model_body = rest_body("Phi-4")
    cfg = compose_cfg(["experiment=phi4_ultrachat", f"backend.config_path={tmp_path / 'none.json'}", *WS_IDS])
    backend = AzureMLBackend(cfg, clients=world.clients(), clock=lambda: TIMESTAMP)
    ctx = make_ctx(cfg, tmp_path)
    record = run_steps(backend, ctx, write_data(tmp_path), steps=(
        "connect", "model", "compute", "data", "finetune", "register", "deploy", "test", "cleanup"))
    job = world.find("workspace.jobs.create_or_update")[0].args[0]
    assert node_inputs(job)["mlflow_model_path"] == "azureml://registries/azureml/models/Phi-4/versions/8"
    assert node_inputs(job)["deepspeed_stage"] == "3"  # Phi-4's model_specific_defaults, from its tags
    facts = record.output("model", "facts")
    assert facts["allow_list_source"]["finetune"] == "registry REST body system metadata (SKU.finetuneRecommendedSkus)"
    assert world.find("workspace.online_deployments.begin_create_or_update")[0].args[0].instance_type == (
        "Standard_NC24ads_A100_v4")
    assert "fine-tune from registry REST body system metadata" in capsys.readouterr().out


# ---- a pipeline job that fails ------------------------------------------------------------------------------


def test_failed_job_stops_the_run_naming_the_job_and_the_studio_url(tmp_path):
    """jobs.stream raises the SDK's JobException for a Failed job: the finetune step ends with an error naming the
    job and its studio page, and nothing is registered or deployed."""
    from azure.ai.ml.exceptions import JobException

    world = AzureWorld()
    world.job_status = "Failed"
    cfg = notebook_cfg(tmp_path)
    backend = AzureMLBackend(cfg, clients=world.clients(), clock=lambda: TIMESTAMP)
    ctx = make_ctx(cfg, tmp_path)
    with pytest.raises(AzureStepError) as info:
        run_steps(backend, ctx, write_data(tmp_path))
    text = str(info.value)
    assert "pipeline job sincere_kettle_42 did not complete" in text
    assert "studio: https://ml.azure.com/runs/sincere_kettle_42" in text
    assert "Out of memory on node 0" in text
    assert isinstance(info.value.__cause__, JobException)
    assert world.names()[-1] == "workspace.jobs.stream"
    assert world.spending() == ["workspace.begin_create_or_update", "workspace.jobs.create_or_update"]
    assert ctx.record.status("finetune") != "ok" and ctx.record.status("register") is None


# ---- the double holds the runner to the SDK's shapes --------------------------------------------------------


def test_the_double_refuses_what_the_sdk_would(tmp_path):
    from azure.ai.ml.entities import Model
    from azure.core.polling import LROPoller

    world = AzureWorld()
    clients = world.clients()
    with pytest.raises(TypeError):
        clients.mlclient_cls(object(), subscription_id="s", resource_group_name="rg", workspace_name="w", extra=1,
                             **{"registry_name": None, "subscription_id": "again"})
    ws = clients.mlclient_cls(object(), subscription_id="s", resource_group_name="rg", workspace_name="w")
    registry = clients.mlclient_cls(object(), registry_name="azureml")
    with pytest.raises(AttributeError):
        ws.jobs.submit  # no such method in JobOperations
    with pytest.raises(TypeError):
        ws.compute.list_sizes("eastus")  # keyword-only in ComputeOperations.list_sizes
    with pytest.raises(TypeError):
        registry.models.get("Phi-3-mini-4k-instruct", lbl="latest")
    with pytest.raises(TypeError):
        ws.online_endpoints.invoke(endpoint="ep")
    model = registry.models.get("Phi-3-mini-4k-instruct", label="latest")
    assert isinstance(model, Model) and model.version == "15"
    # the registry lists active models only, as containers (name and latest version, no tags)
    assert [(m.name, m.version, m.latest_version, m.tags) for m in registry.models.list()] == [
        ("Phi-4", None, "8", {})]
    poller = ws.online_endpoints.begin_delete(name="ep")
    # as the service: InProgress for the first looks, done once waited for
    assert isinstance(poller, LROPoller) and not poller.done() and poller.status() == "InProgress"
    with pytest.raises(TypeError):
        poller.wait(1, 2)
    poller.wait()
    assert poller.done() and poller.status() == "Succeeded" and world.unfinished() == []
    # what the service refuses: AmlCompute(tier="LowPriority") goes on the wire as vmPriority "Lowpriority"
    from azure.ai.ml.entities import AmlCompute
    from azure.core.exceptions import HttpResponseError

    with pytest.raises(HttpResponseError, match="Lowpriority"):
        ws.begin_create_or_update(AmlCompute(name="c", size="Standard_ND96asr_v4", tier="LowPriority"))
    ws.begin_create_or_update(AmlCompute(name="c", size="Standard_ND96asr_v4", tier="low_priority")).wait()
    names = world.names()
    assert names[names.index("registry.models.get"):] == [
        "registry.models.get", "registry.models.list", "workspace.online_endpoints.begin_delete",
        "workspace.online_endpoints.begin_delete.wait", "workspace.begin_create_or_update",
        "workspace.begin_create_or_update", "workspace.begin_create_or_update.wait"]
