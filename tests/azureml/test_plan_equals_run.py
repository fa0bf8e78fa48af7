"""What a dry run writes is what a real run submits.

For every azureml experiment in conf/experiment/ as shipped, and each preset combination, the same config goes
through `dry_run=true` (the steps with the planning clients,
writing plan/*.yaml) and through a real run against the SDK-faithful double (tests/azureml/double.py). Every object
the real run hands to Azure is serialised by the same function the plan used and compared with the plan file; a
config one path refuses, the other refuses with the same message. No model version is pinned: the real run's
`models.get(label="latest")` resolves as the SDK does (the double), the plan answers the preset's latest_version.

The differences allowed are the service's own names: it names the submitted job (the plan says PIPELINE_JOB_NAME
where the model's path refers to it) and the registered model by its ARM id (the plan: `azureml:name:version`, the
same model; both are compared as (name, version)).
"""

import json
import re
from pathlib import Path

import pytest
import yaml

from runner.azureml.backend import AzureMLBackend
from runner.azureml.planning import (JOB_NAME_PLACEHOLDER, component_reference, entity_yaml, pipeline_job_yaml,
                                     plain)
from runner.azureml.translate import NODE_NAME
from runner.workflow import run
from tests.azureml.double import AzureWorld, rest_body
from tests.conftest import REPO, compose_cfg

CLOCK = 1795600000.0
# Every step but metrics, which reads the workspace's MLflow after the job (nothing is sent). The evaluate step's
# figures are read back from the workspace's MLflow too: the double's store holds the job's run (EVALUATION).
STEPS = "steps=[connect,model,compute,data,finetune,evaluate,register,deploy,test,cleanup]"
EVALUATION = {f"eval_{side}_{m}": value for m in ("loss", "perplexity", "token_accuracy", "rouge_l", "bleu", "chrf",
                                                  "exact_match", "reply_length", "stop_rate")
              for side, value in (("base", 1.0), ("ft", 2.0), ("delta", 1.0), ("delta_ci_low", 0.5),
                                  ("delta_ci_high", 1.5))}
EVALUATION["eval_rows"] = 64
WS = ["backend.subscription_id=sub-0000", "backend.resource_group=rg-demo", "backend.workspace_name=ws-demo"]
MODEL_PRESETS = ["phi3_mini_4k_instruct", "phi35_mini_instruct", "phi4"]
AZURE_COMPUTES = ["nc24ads_a100_v4", "nc40ads_h100_v5", "nc48ads_a100_v4",
                  "nc80adis_h100_v5", "nc96ads_a100_v4", "nd40rs_v2", "nd96amsr_a100_v4", "nd96asr_v4",
                  "nd96isr_h100_v5"]
EXPERIMENT_DIR = REPO / "conf" / "experiment"


def covering_matrix():
    """Every compute with every model; the fast tier (-m "not slow") keeps a diagonal that still names each compute
    and each model once, the whole suite runs all of it (each case is a dry run and a run, ~2.5 s)."""
    cases = []
    for i, compute in enumerate(AZURE_COMPUTES):
        for j, model in enumerate(MODEL_PRESETS):
            fast = j == i % len(MODEL_PRESETS)
            cases.append(pytest.param(compute, model, marks=() if fast else pytest.mark.slow))
    return cases


def azure_experiments():
    """Every experiment preset that runs on azureml, found in conf/experiment/ (a new one is included as added)."""
    return sorted(p.stem for p in EXPERIMENT_DIR.glob("*.yaml")
                  if compose_cfg([f"experiment={p.stem}"]).backend.name == "azureml")


def _model_ref(value):
    """azureml:<ARM id>/models/NAME/versions/V or azureml:NAME:V → (NAME, V)."""
    m = re.search(r"models/([^/]+)/versions/([^/]+)$", value) or re.match(r"azureml:([^:]+):(.+)$", value)
    return m.groups() if m else value


def _normalise(kind, data):
    if kind == "deployment":
        data["model"] = _model_ref(data["model"])
    if kind == "serverless_endpoint":  # the workspace's region and id are the service's: the model is (name, version)
        data["model_id"] = _model_ref(data["model_id"])
    if kind == "model":
        data["path"] = re.sub(r"^azureml://jobs/[^/]+/", f"azureml://jobs/{JOB_NAME_PLACEHOLDER}/", data["path"])
    if kind == "evaluate_ft_endpoint":
        data["model_id"] = _model_ref(data["model_id"])
    if kind == "evaluate_job":  # the fine-tuned model: the job's output (named by the service) or its registered model
        path = data["inputs"]["ft_model"]["path"]
        data["inputs"]["ft_model"]["path"] = _model_ref(path) if not path.startswith("azureml://") else re.sub(
            r"^azureml://jobs/[^/]+/", f"azureml://jobs/{JOB_NAME_PLACEHOLDER}/", path)
    return data


def _normalise_wire(kind, body):
    """The service's names in a REST body, as _normalise does for the YAML."""
    text = json.dumps(body, sort_keys=True)
    text = re.sub(r"azureml://jobs/[^/\"]+/", f"azureml://jobs/{JOB_NAME_PLACEHOLDER}/", text)
    text = re.sub(r'"(?:azureml:)?(?:/subscriptions/[^"]*/models/([^/"]+)/versions/([^/"]+)|azureml:([^:"/]+):([^"]+))"',
                  lambda m: f'"model {m.group(1) or m.group(3)}:{m.group(2) or m.group(4)}"', text)
    text = re.sub(r'"azureml://locations/[^/"]+/workspaces/[^/"]+/models/', '"azureml://(workspace)/models/', text)
    return json.loads(text)


def submitted_wire(world):
    """The REST body the SDK would send for each entity the real run handed to Azure (the last of each kind), by
    the function the plan used (runner/azureml/wire.py)."""
    from azure.ai.ml.entities import AmlCompute, OnlineEndpoint

    from runner.azureml.wire import wire_body

    from runner.azureml.serverless_evaluate import plan_kind

    kinds = {"workspace.models.create_or_update": ("model", "model"),
             "workspace.online_deployments.begin_create_or_update": ("deployment", "deployment")}
    out = {}
    for call in world.calls:
        if call.name == "workspace.serverless_endpoints.begin_create_or_update":
            endpoint = call.args[0] if call.args else call.kwargs["endpoint"]
            out[plan_kind(endpoint.name)] = wire_body(endpoint)
            continue
        if call.name == "workspace.begin_create_or_update":
            entity = call.args[0] if call.args else call.kwargs["entity"]
            out["compute" if isinstance(entity, AmlCompute) else "endpoint"] = wire_body(entity)
        elif call.name == "workspace.jobs.create_or_update":
            job = call.args[0] if call.args else call.kwargs["job"]
            if getattr(job, "type", None) == "finetuning":
                out["finetuning_job"] = wire_body(job)
        elif call.name in kinds:
            kind, key = kinds[call.name]
            out[kind] = wire_body(call.args[0] if call.args else call.kwargs[key])
    return {k: _normalise_wire(k, v) for k, v in out.items()}


def planned_wire(plan_dir):
    return {p.name[:-len(".rest.json")]: _normalise_wire(p.name, json.loads(p.read_text()))
            for p in plan_dir.glob("*.rest.json")}


def submitted_objects(world, cfg):
    """The real run's objects, serialised as the plan serialises them: the last of each kind (the endpoint is
    submitted twice, the second time with its traffic); under "wire", the REST bodies the SDK would send."""
    from azure.ai.ml.entities import AmlCompute, OnlineEndpoint

    out = {}
    for call in world.calls:
        if call.name == "workspace.begin_create_or_update":
            entity = call.args[0] if call.args else call.kwargs["entity"]
            kind = "compute" if isinstance(entity, AmlCompute) else "endpoint" if isinstance(
                entity, OnlineEndpoint) else None
            out[kind] = entity_yaml(entity)
        elif call.name == "workspace.jobs.create_or_update" and getattr(
                call.args[0] if call.args else call.kwargs["job"], "type", None) == "finetuning":
            from runner.azureml.finetuning_job import finetuning_job_yaml

            out["finetuning_job"] = finetuning_job_yaml(call.args[0] if call.args else call.kwargs["job"])
        elif call.name == "workspace.jobs.create_or_update" and getattr(
                call.args[0] if call.args else call.kwargs["job"], "type", None) == "command":
            from runner.azureml.evaluate_job import evaluate_job_yaml

            out["evaluate_job"] = evaluate_job_yaml(call.args[0] if call.args else call.kwargs["job"])
        elif call.name == "workspace.jobs.create_or_update":
            job = call.args[0] if call.args else call.kwargs["job"]
            out["pipeline_job"] = plain(pipeline_job_yaml(
                job, component_ref=component_reference(job.jobs[NODE_NAME].component, cfg),
                experiment_name=call.kwargs.get("experiment_name")))
        elif call.name == "workspace.models.create_or_update":
            out["model"] = entity_yaml(call.args[0] if call.args else call.kwargs["model"])
        elif call.name == "workspace.online_deployments.begin_create_or_update":
            out["deployment"] = entity_yaml(call.args[0] if call.args else call.kwargs["deployment"])
        elif call.name == "workspace.serverless_endpoints.begin_create_or_update":
            from runner.azureml.serverless import serverless_endpoint_yaml
            from runner.azureml.serverless_evaluate import plan_kind

            endpoint = call.args[0] if call.args else call.kwargs["endpoint"]
            out[plan_kind(endpoint.name)] = serverless_endpoint_yaml(endpoint)
    out = {k: _normalise(k, v) for k, v in out.items()}
    out["wire"] = submitted_wire(world)
    return out


def planned_objects(plan_dir):
    out = {p.stem: _normalise(p.stem, yaml.safe_load(p.read_text()))
           for p in plan_dir.glob("*.yaml") if p.stem != "plan"}
    out["wire"] = planned_wire(plan_dir)
    return out


def world_for(cfg):
    """The double serving the registry's body of the model the config asks for, and the cluster size's GPUs."""
    from azure.ai.ml.entities import VmSize

    from tests.azureml.double import REST_BODIES

    if cfg.model.name not in REST_BODIES:
        pytest.fail(f"the double has no registry REST body for model {cfg.model.name}: record one under "
                    f"tests/fixtures/azureml/ and add it to REST_BODIES (tests/azureml/double.py)")
    world = AzureWorld()
    world.model_body = rest_body(cfg.model.name)
    world.sizes = [VmSize(name=cfg.compute.size, gpus=cfg.compute.gpus_per_node or 1)]
    return world


def both_ways(tmp_path, overrides):
    """(outcome of the real run, outcome of the dry run): the objects, or the refusal's message. The registry
    serves the model's REST fixture, and `latest` resolves as the SDK resolves it; the dry run answers from the
    model preset. No version is pinned."""
    overrides = [*overrides, STEPS, "dataset=sample", f"backend.config_path={tmp_path / 'none.json'}", *WS]
    cfg = compose_cfg(overrides)
    world = world_for(cfg)
    world.log_evaluation(tmp_path / "workspace-mlflow", EVALUATION)
    real_dir, plan_run_dir = tmp_path / "real", tmp_path / "plan"
    try:
        run(cfg, run_dir=real_dir, task_overrides=overrides,
            backend=AzureMLBackend(cfg, clients=world.clients(), clock=lambda: CLOCK))
        real = submitted_objects(world, cfg)
    except Exception as exc:
        real = f"{type(exc).__name__}: {exc}"

    dry = compose_cfg(overrides + ["dry_run=true"])
    try:
        run(dry, run_dir=plan_run_dir, task_overrides=overrides + ["dry_run=true"],
            backend=AzureMLBackend(dry, clock=lambda: CLOCK))
        planned = planned_objects(plan_run_dir / "plan")
    except Exception as exc:
        planned = f"{type(exc).__name__}: {exc}"
    return real, planned


def test_every_azure_experiment_is_found():
    assert {"phi3_ultrachat", "phi4_ultrachat"} <= set(azure_experiments())


@pytest.mark.parametrize("experiment", azure_experiments())
def test_every_experiment_as_shipped_plans_what_the_run_submits(tmp_path, experiment):
    """The experiment exactly as shipped (the registry's `latest`, nothing pinned). An archived model is refused by
    the run and a warning in the plan: then both name the same archived model, and with allow_archived=true the
    objects are equal (the next test)."""
    real, planned = both_ways(tmp_path, [f"experiment={experiment}"])
    if isinstance(real, str) and "is archived" in real:
        plan = yaml.safe_load((tmp_path / "plan" / "plan" / "plan.yaml").read_text())
        name = compose_cfg([f"experiment={experiment}"]).model.name
        assert real.startswith(f"ConfigError: model {name} is archived")
        assert any(w.startswith(f"model {name} is archived") for w in plan["warnings"]), plan["warnings"]
        return
    assert isinstance(real, dict), real
    assert planned == real


@pytest.mark.parametrize("experiment", azure_experiments())
def test_every_experiment_allowed_to_run_plans_what_the_run_submits(tmp_path, experiment):
    real, planned = both_ways(tmp_path, [f"experiment={experiment}", "model.allow_archived=true"])
    assert isinstance(real, dict), real
    assert real  # something was submitted, and the plan holds each object the run handed to Azure
    assert planned == real


def test_the_plan_and_the_run_name_the_same_model_version_not_the_label(tmp_path):
    """The registry's `latest` is resolved to a version in both: the run by the SDK's label resolution, the plan
    from the model preset's latest_version."""
    real, planned = both_ways(tmp_path, ["experiment=phi4_ultrachat"])
    path = real["pipeline_job"]["jobs"][NODE_NAME]["inputs"]["mlflow_model_path"]["path"]
    assert path == "azureml://registries/azureml/models/Phi-4/versions/8"
    assert planned["pipeline_job"]["jobs"][NODE_NAME]["inputs"]["mlflow_model_path"]["path"] == path


@pytest.mark.parametrize("tier, finetune", [
    # the fast tier: every finetune preset once, and the low-priority tier once; the rest with the whole suite
    *[("dedicated", f) for f in ["default", "lora", "lora_deepspeed2", "full_deepspeed3"]],
    ("low_priority", "default"),
    *[pytest.param("low_priority", f, marks=pytest.mark.slow) for f in ["lora", "lora_deepspeed2", "full_deepspeed3"]],
])
def test_notebook_presets_plan_what_the_run_submits(tmp_path, finetune, tier):
    real, planned = both_ways(tmp_path, ["experiment=phi3_ultrachat", f"finetune={finetune}",
                                         f"compute.tier={tier}", "model.allow_archived=true"])
    assert isinstance(real, dict), real
    assert sorted(real) == ["compute", "deployment", "endpoint", "evaluate_job", "model", "pipeline_job", "wire"]
    assert planned == real


@pytest.mark.parametrize("compute, model", covering_matrix())
def test_every_compute_and_model_preset_plans_what_the_run_submits_or_refuses_alike(tmp_path, model, compute):
    # an endpoint size the model allows, so that each cluster size allowed for fine-tuning plans the whole run
    from runner.retired_skus import retired

    instance = next(s for s in compose_cfg([f"model={model}"]).model.inference_compute_allow_list if not retired(s))
    real, planned = both_ways(tmp_path, ["backend=azureml", f"model={model}", f"compute={compute}",
                                         "deployment=azure", f"deployment.instance_type={instance}",
                                         "model.allow_archived=true"])
    assert planned == real
    allowed = compose_cfg([f"model={model}", f"compute={compute}"])
    if allowed.compute.size in allowed.model.finetune_compute_allow_list:
        assert isinstance(real, dict) and sorted(real) == ["compute", "deployment", "endpoint", "evaluate_job",
                                                           "model", "pipeline_job", "wire"], real
    else:
        assert "is not in" in real and "fine-tune compute allow list" in real


def test_the_serverless_experiment_plans_what_the_run_submits(tmp_path):
    """experiment=phi4_mini_serverless as shipped: the finetuning job and the serverless endpoint a run hands to Azure
    are the plan's files, and both name the model version `latest` resolves to (never the label)."""
    real, planned = both_ways(tmp_path, ["experiment=phi4_mini_serverless"])
    assert isinstance(real, dict), real
    assert sorted(real) == ["evaluate_base_endpoint", "evaluate_ft_endpoint", "finetuning_job",
                            "serverless_endpoint", "wire"]
    path = real["finetuning_job"]["model"]["path"]
    assert path == "azureml://registries/azureml/models/Phi-4-mini-instruct/versions/3"
    assert planned == real


def test_the_serverless_plan_says_chat_completion_and_so_does_the_rest_body_sent(tmp_path):
    """The task value: the plan's YAML and the REST body the SDK sends for the submitted job both say
    `chatCompletion` (FineTuningTaskType.CHAT_COMPLETION), and the plan's REST body is the run's."""
    real, planned = both_ways(tmp_path, ["experiment=phi4_mini_serverless"])
    assert planned["finetuning_job"]["task"] == real["finetuning_job"]["task"] == "chatCompletion"
    details = real["wire"]["finetuning_job"]["properties"]["fineTuningDetails"]
    assert details["taskType"] == "chatCompletion"
    assert planned["wire"]["finetuning_job"] == real["wire"]["finetuning_job"]
    assert sorted(planned["wire"]) == ["evaluate_base_endpoint", "evaluate_ft_endpoint", "finetuning_job",
                                       "serverless_endpoint"]


@pytest.mark.parametrize("where", [[], ["compute.instance_types=[Standard_NC24ads_A100_v4]", "compute.job_tier=spot"]],
                         ids=["cluster", "instance_types"])
def test_the_finetuning_job_on_managed_compute_plans_what_the_run_submits(tmp_path, where):
    real, planned = both_ways(tmp_path, ["experiment=phi4_ultrachat", "finetune.route=finetuning_job", *where])
    assert isinstance(real, dict), real
    expected = ["deployment", "endpoint", "evaluate_job", "finetuning_job", "wire"] + ([] if where else ["compute"])
    assert sorted(real) == sorted(expected)
    assert real["finetuning_job"]["model"]["path"] == "azureml://registries/azureml/models/Phi-4/versions/8"
    assert planned == real
