"""The dry run is the real steps with recording clients: findings that a second copy of the steps hid."""

import yaml

from runner.azureml.spec import check_live_component, compare_specs, load_spec, spec_from_dict
from runner.schema import ConfigError
from runner.workflow import run
from tests.conftest import compose_cfg

import pytest


def dry_run(run_dir, *overrides):
    overrides = ["experiment=phi3_ultrachat", "dry_run=true", *overrides]
    run(compose_cfg(overrides), run_dir=run_dir, task_overrides=overrides)
    return run_dir / "plan"


def test_low_priority_tier_plans_a_compute_the_sdk_loads(tmp_path):
    """compute.tier=low_priority used to become "LowPriority" -> vm_priority "Lowpriority": a marshmallow
    ValidationError traceback."""
    from azure.ai.ml import load_compute

    plan = dry_run(tmp_path / "run", "compute.tier=low_priority")
    compute = load_compute(source=str(plan / "compute.yaml"))
    assert compute.tier == "low_priority"
    assert compute._to_rest_object().properties.properties.vm_priority == "LowPriority"


def test_data_paths_are_absolute_whatever_the_directory(tmp_path, monkeypatch):
    """A relative download_dir recorded by one run is found by a later run started elsewhere (from_run=)."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    common = ["backend=azureml", "compute=nd96asr_v4", "deployment=azure", "model=phi3_mini_4k_instruct",
              "model.allow_archived=true", "dataset=sample", "dataset.download_dir=rel/data"]
    monkeypatch.chdir(first)
    run(compose_cfg(common + ["steps=[data]"]), run_dir=first / "run")
    monkeypatch.chdir(second)
    plan = dry_run(second / "run", *common, "steps=[finetune]", f"from_run={first / 'run'}")
    node = yaml.safe_load((plan / "pipeline_job.yaml").read_text())["jobs"]["chat_completion_pipeline"]
    train = node["inputs"]["train_file_path"]["path"]
    assert train == str(first / "rel" / "data" / "train_sft.jsonl")
    assert (first / "rel" / "data" / "train_sft.jsonl").is_file()


def _spec(inputs):
    return spec_from_dict({"name": "chat_completion_pipeline", "version": "9", "inputs": inputs}, "registry")


def test_the_live_component_is_compared_with_the_pinned_contract():
    from runner.azureml.spec import DEFAULT_SPEC

    pinned = load_spec(str(DEFAULT_SPEC))
    raw = yaml.safe_load(DEFAULT_SPEC.read_text())
    inputs = dict(raw["inputs"])
    del inputs["max_steps"]
    inputs["lora_target_modules"] = {"type": "string", "optional": True}
    inputs["precision"] = {"type": "string", "enum": ["32", "16", "bf16"]}
    diff = compare_specs(pinned, _spec(inputs))
    assert diff.added == ["lora_target_modules"] and diff.removed == ["max_steps"]
    assert diff.retyped == ["precision: string ['16', '32'] -> string ['16', '32', 'bf16']"]
    check_live_component(diff, sent=["learning_rate", "precision"])  # nothing we send is gone: fine
    with pytest.raises(ConfigError, match=r"no longer declares input\(s\) \['max_steps'\]"):
        check_live_component(diff, sent=["learning_rate", "max_steps"])
    assert not compare_specs(pinned, pinned)


def test_the_plan_records_every_call_in_order_and_the_component_version(tmp_path):
    plan = dry_run(tmp_path / "run")
    summary = yaml.safe_load((plan / "plan.yaml").read_text())
    calls = [c["call"] for c in summary["calls"]]
    assert calls == [
        "registry.models.get",
        "workspace.compute.get", "workspace.begin_create_or_update", "workspace.compute.get",
        "workspace.compute.list_sizes",
        "registry.components.get", "workspace.jobs.create_or_update", "workspace.jobs.stream",
        "workspace.jobs.create_or_update",  # the evaluate job, after the fine-tune job
        "workspace.models.create_or_update",
        "workspace.models.get", "workspace.models.download",  # the export step: the version, fetched
        "workspace.begin_create_or_update", "workspace.online_deployments.begin_create_or_update",
        "workspace.begin_create_or_update",
        "workspace.online_endpoints.invoke",
        "workspace.online_endpoints.begin_delete",
    ]
    assert summary["component"]["version"] == "0.0.82"
    assert summary["finetune"]["component_inputs"]["learning_rate"] == pytest.approx(5e-6)
    assert summary["calls"][6]["file"].endswith("pipeline_job.yaml")


def _live_component(tmp_path, change):
    from azure.ai.ml import load_component

    from runner.azureml.spec import DEFAULT_SPEC

    data = yaml.safe_load(DEFAULT_SPEC.read_text())
    change(data["inputs"])
    data["version"] = "0.0.99"
    path = tmp_path / "live_component.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_component(source=str(path))


def test_an_input_the_run_sends_that_the_live_component_dropped_is_refused_before_submission(tmp_path):
    from runner.azureml.backend import AzureMLBackend
    from tests.azureml.double import AzureWorld
    from tests.azureml.test_backend import make_ctx, notebook_cfg, run_steps, write_data

    world = AzureWorld()
    world.component = _live_component(tmp_path, lambda inputs: inputs.pop("lr_scheduler_type"))
    cfg = notebook_cfg(tmp_path)
    with pytest.raises(ConfigError, match=r"no longer declares input\(s\) \['lr_scheduler_type'\]"):
        run_steps(AzureMLBackend(cfg, clients=world.clients()), make_ctx(cfg, tmp_path), write_data(tmp_path))
    assert "registry.components.get" in world.names()
    assert "workspace.jobs.create_or_update" not in world.names()


def test_an_added_input_is_reported_and_the_live_version_recorded(tmp_path, capsys):
    from runner.azureml.backend import AzureMLBackend
    from tests.azureml.double import AzureWorld
    from tests.azureml.test_backend import make_ctx, notebook_cfg, run_steps, write_data

    world = AzureWorld()
    world.component = _live_component(
        tmp_path, lambda inputs: inputs.update(neftune_noise_alpha={"type": "number", "optional": True}))
    cfg = notebook_cfg(tmp_path)
    ctx = make_ctx(cfg, tmp_path)
    run_steps(AzureMLBackend(cfg, clients=world.clients()), ctx, write_data(tmp_path),
              steps=("connect", "model", "compute", "data", "finetune"))
    assert "inputs added in chat_completion_pipeline 0.0.99" in capsys.readouterr().out
    finetune = ctx.record.output("finetune")
    assert finetune["component_version"] == "0.0.99"
    assert finetune["component_diff"]["added"] == ["neftune_noise_alpha"]
    assert "workspace.jobs.create_or_update" in world.names()
