"""`models.get(name, label="latest")` as azure-ai-ml 1.35.2 answers it for a registry, and the runner submitting
the version it resolves to (never the label), in a real run and in the plan."""

import pytest

from runner.azureml.backend import AzureMLBackend
from runner.workflow import run
from tests.azureml.double import AzureWorld
from tests.conftest import compose_cfg
from tests.azureml.test_backend import TIMESTAMP, WS_IDS


def _registry(world):
    clients = world.clients()
    return clients.registry(clients.credential(compose_cfg(["backend=azureml"]).backend), "azureml")


def test_latest_is_the_newest_created_version_archived_ones_included():
    from azure.ai.ml.exceptions import ValidationException

    world = AzureWorld()
    world.add_model_version("Phi-4", "9", created_at="2026-06-01T00:00:00Z", archived=True)
    world.add_model_version("Phi-4", "7", created_at="2024-06-01T00:00:00Z")
    registry = _registry(world)
    latest = registry.models.get("Phi-4", label="latest")
    assert (latest.version, latest.id) == ("9", "azureml://registries/azureml/models/Phi-4/versions/9")
    assert registry.models.get("Phi-4", version="7").version == "7"
    # listing with the default view leaves the archived version out; the label's resolution does not
    assert sorted(m.version for m in registry.models.list("Phi-4")) == ["7", "8"]
    with pytest.raises(ValidationException, match="Cannot specify both version and label"):
        registry.models.get("Phi-4", version="8", label="latest")
    with pytest.raises(ValidationException, match="version label stable does not exist"):
        registry.models.get("Phi-4", label="stable")
    with pytest.raises(ValidationException, match="Asset Phi-9 does not exist"):
        registry.models.get("Phi-9", label="latest")


def test_a_run_submits_the_version_latest_resolves_to(tmp_path):
    world = AzureWorld()
    world.model_body = world.registry_bodies["Phi-4"]
    world.add_model_version("Phi-4", "10", created_at="2026-10-01T00:00:00Z")
    overrides = ["experiment=phi4_ultrachat", "dataset=sample", "steps=[connect,model,compute,data,finetune]",
                 f"backend.config_path={tmp_path / 'none.json'}", *WS_IDS]
    cfg = compose_cfg(overrides)
    record = run(cfg, run_dir=tmp_path / "run", task_overrides=overrides,
                 backend=AzureMLBackend(cfg, clients=world.clients(), clock=lambda: TIMESTAMP))
    assert record.output("model", "model_id") == "azureml://registries/azureml/models/Phi-4/versions/10"
    job = world.find("workspace.jobs.create_or_update")[0].args[0]
    assert job.jobs["chat_completion_pipeline"].inputs["mlflow_model_path"]._data.path == (
        "azureml://registries/azureml/models/Phi-4/versions/10")


def test_the_plan_answers_the_presets_version_for_latest_and_warns_without_one(tmp_path):
    overrides = ["experiment=phi4_ultrachat", "dataset=sample", "steps=[connect,model]", "dry_run=true"]
    cfg = compose_cfg(overrides)
    record = run(cfg, run_dir=tmp_path / "a", task_overrides=overrides, backend=AzureMLBackend(cfg))
    assert record.output("model", "model_id") == "azureml://registries/azureml/models/Phi-4/versions/8"

    cfg = compose_cfg(overrides + ["model.latest_version=null"])
    record = run(cfg, run_dir=tmp_path / "b", task_overrides=overrides, backend=AzureMLBackend(cfg))
    assert record.output("model", "model_id").endswith("/Phi-4/labels/latest")
    assert any("has no version in the model preset" in w for w in record.output("plan", "warnings"))


def test_another_model_name_gets_none_of_the_presets_facts_in_a_plan(tmp_path):
    overrides = ["experiment=phi4_ultrachat", "dataset=sample", "steps=[connect,model]", "dry_run=true",
                 "model.name=Phi-4-mini-instruct", "compute=nd40rs_v2"]  # ND40rs_v2 is outside Phi-4's list
    cfg = compose_cfg(overrides)
    record = run(cfg, run_dir=tmp_path / "a", task_overrides=overrides, backend=AzureMLBackend(cfg))
    facts = record.output("model", "facts")
    assert facts["finetune_allow_list"] == [] and facts["model_specific_defaults"] == {}
    assert facts["allow_list_source"]["finetune"].startswith("none (the model preset's")
    assert any("holds the registry facts of Phi-4, not of Phi-4-mini-instruct" in w
               for w in record.output("plan", "warnings"))
