"""`experiment=phi3_ultrachat dry_run=true`: the plan files, loaded back by azure-ai-ml's own load_* functions."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from runner.schema import ConfigError
from runner.workflow import run
from tests.azureml.double import PIPELINE_SPEC
from tests.conftest import REPO, compose_cfg

DISPLAY_NAME = "Phi-3-mini-4k-instruct-ultrachat-bs8-cosine-ds2-lora-save_limit1-seqlen-1"


def dry_run(tmp_path, *overrides):
    overrides = ["experiment=phi3_ultrachat", "dry_run=true", *overrides]
    cfg = compose_cfg(overrides)
    run(cfg, run_dir=tmp_path / "run", task_overrides=overrides)
    return tmp_path / "run" / "plan"


def load(plan, name):
    from azure.ai.ml import load_compute, load_job, load_model, load_online_deployment, load_online_endpoint

    loaders = {"compute": load_compute, "pipeline_job": load_job, "model": load_model,
               "endpoint": load_online_endpoint, "deployment": load_online_deployment}
    return loaders[name](source=str(plan / f"{name}.yaml"))


def test_notebook_plan_loads_back_with_the_sdk(tmp_path):
    plan = dry_run(tmp_path)
    compute = load(plan, "compute")
    assert (type(compute).__name__, compute.name, compute.size, compute.max_instances) == (
        "AmlCompute", "gpu-cluster-big", "Standard_ND96asr_v4", 2)

    job = load(plan, "pipeline_job")
    assert type(job).__name__ == "PipelineJob"
    assert job.display_name == DISPLAY_NAME and job.experiment_name == "chat_completion_Phi-3-mini-4k-instruct"
    assert job.settings.force_rerun is True and job.settings.continue_on_step_failure is False
    node = job.jobs["chat_completion_pipeline"]
    assert node.component == "azureml://registries/azureml/components/chat_completion_pipeline/labels/latest"
    raw = yaml.safe_load((plan / "pipeline_job.yaml").read_text())["jobs"]["chat_completion_pipeline"]["inputs"]
    assert raw["number_of_gpu_to_use_finetuning"] == 8
    assert raw["compute_finetune"] == "gpu-cluster-big"
    # what models.get(label="latest") resolves to (the preset's latest_version), never the label
    assert raw["mlflow_model_path"]["path"] == ("azureml://registries/azureml/models/Phi-3-mini-4k-instruct/"
                                                "versions/15")
    assert raw["train_file_path"]["path"].endswith("ultrachat_200k/train_sft.jsonl")
    assert (raw["apply_lora"], raw["apply_deepspeed"], raw["deepspeed_stage"], raw["precision"]) == (
        "true", "true", "2", "16")
    assert "learning_rate_min" not in raw

    model = load(plan, "model")
    assert model.name == "Phi-3-mini-4k-instruct-ultrachat-200k" and model.type == "mlflow_model"
    assert model.path.endswith("/outputs/trained_model")
    endpoint = load(plan, "endpoint")
    assert endpoint.name.startswith("ultrachat-completion-") and endpoint.auth_mode == "key"
    assert endpoint.traffic == {"demo": 100}
    deployment = load(plan, "deployment")
    assert (deployment.name, deployment.endpoint_name, deployment.instance_type) == (
        "demo", endpoint.name, "Standard_NC24ads_A100_v4")
    assert deployment.model.removeprefix("azureml:") == f"{model.name}:{model.version}"
    assert deployment.liveness_probe.initial_delay == 600
    assert deployment.request_settings.request_timeout_ms == 90000

    request = json.loads((plan / "request.json").read_text())
    assert request["input_data"]["input_string"][0][0]["role"] == "user"
    assert request["input_data"]["parameters"]["max_new_tokens"] == 200

    summary = yaml.safe_load((plan / "plan.yaml").read_text())
    assert summary["display_name"] == DISPLAY_NAME
    assert any("archived" in w and "2025-08-30" in w and "model=phi4" in w
               for w in summary["warnings"])
    assert "model_specific_defaults.learning_rate_min=5e-07 dropped: not an input of the component" in \
        summary["finetune"]["merge_notes"]


def test_explicit_overrides_win_in_the_plan(tmp_path):
    plan = dry_run(tmp_path, "finetune.num_train_epochs=3", "finetune.learning_rate=1e-5")
    summary = yaml.safe_load((plan / "plan.yaml").read_text())
    inputs = summary["finetune"]["component_inputs"]
    assert inputs["num_train_epochs"] == 3 and inputs["learning_rate"] == pytest.approx(1e-5)
    assert inputs["save_total_limit"] == 1  # still the model's default
    assert summary["finetune"]["explicit_overrides"] == ["learning_rate", "num_train_epochs"]


def test_plan_refuses_a_size_outside_the_allow_list(tmp_path):
    with pytest.raises(ConfigError, match="compute.size=Standard_ND40rs_v2 is not in"):
        dry_run(tmp_path, "compute=nd40rs_v2")
    assert not (tmp_path / "run" / "plan" / "pipeline_job.yaml").exists()


def test_plan_validates_explicit_keys_against_the_spec_file(tmp_path):
    data = yaml.safe_load(PIPELINE_SPEC.read_text())
    del data["inputs"]["warmup_steps"]
    for job in data["jobs"].values():
        job.get("inputs", {}).pop("warmup_steps", None)
    trimmed = tmp_path / "older.yaml"
    trimmed.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(ConfigError, match="finetune.warmup_steps is not an input"):
        dry_run(tmp_path, f"backend.component_spec={trimmed}", "finetune.warmup_steps=10")
    # not set explicitly: left out with a note, and the plan is written
    plan = dry_run(tmp_path, f"backend.component_spec={trimmed}")
    summary = yaml.safe_load((plan / "plan.yaml").read_text())
    assert "warmup_steps" not in summary["finetune"]["component_inputs"]
    assert any(n.startswith("finetune.warmup_steps left out") for n in summary["finetune"]["merge_notes"])


def test_plan_with_a_spec_exported_from_the_registry(tmp_path):
    raw = yaml.safe_load(PIPELINE_SPEC.read_text())
    exported = {**raw, "id": "azureml://registries/azureml/components/chat_completion_pipeline/versions/0.0.82",
                "creation_context": {"created_at": "2026-06-30T00:00:00Z"}}
    path = tmp_path / "exported.json"
    path.write_text(json.dumps(exported))
    plan = dry_run(tmp_path, f"backend.component_spec={path}")
    job = load(plan, "pipeline_job")
    assert job.jobs["chat_completion_pipeline"].component == exported["id"]


def test_plan_uses_the_sample_split_when_it_is_on_disk(tmp_path, ftrun_home):
    pytest.importorskip("runner.data.sample_request")
    sample = ftrun_home / "data" / "ultrachat_200k" / "test_gen.jsonl"
    sample.parent.mkdir(parents=True)
    rows = [{"prompt": f"q{i}", "prompt_id": str(i), "messages": [{"role": "user", "content": f"question {i}"},
                                                                    {"role": "assistant", "content": "a"}]}
            for i in range(5)]
    sample.write_text("".join(json.dumps(r) + "\n" for r in rows))
    request = json.loads((dry_run(tmp_path) / "request.json").read_text())
    assert request["input_data"]["input_string"][0][0]["content"].startswith("question ")


def test_ftrun_dry_run_needs_no_network_credentials_or_heavy_imports(tmp_path):
    """The CLI from the repo root, sockets refused, no Azure variables, CI set; torch/transformers/mlflow unloaded."""
    out_dir = tmp_path / "X"
    script = (
        "import socket, sys\n"
        "def refuse(*a, **k): raise OSError('network used during dry run')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "import runner.cli\n"
        f"sys.argv = ['ftrun', 'experiment=phi3_ultrachat', 'dry_run=true', 'hydra.run.dir={out_dir}']\n"
        "code = 0\n"
        "try:\n"
        "    runner.cli.main()\n"
        "except SystemExit as e:\n"
        "    code = e.code or 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'mlflow', 'peft', 'trl'))\n"
        "print('HEAVY', heavy)\n"
        "sys.exit(code)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE", "AZUREML", "MSI_", "IDENTITY_"))}
    env.update(CI="1", FTRUN_HOME=str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HEAVY []" in proc.stdout
    for name in ("compute", "pipeline_job", "model", "endpoint", "deployment"):
        assert (out_dir / "plan" / f"{name}.yaml").is_file()
    assert (out_dir / "plan" / "request.json").is_file()
    assert DISPLAY_NAME in proc.stdout
