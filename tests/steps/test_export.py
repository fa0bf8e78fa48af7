"""The `export` step (runner/steps/export.py) wired into the workflow: which model it takes (the register step's
version, checked first; export.model=models:/NAME/VERSION; a folder), its refusals before anything is written, the
outputs' paths and sha256 in the run record and as MLflow artifacts of the version's run, and the azureml side
(models.download, planned in the dry run, exercised against the SDK-built double)."""

import json
import shutil
from pathlib import Path

import pytest

from runner.atomic import sha256_file
from runner.errors import MissingInput
from runner.record import load_record
from runner.schema import ConfigError
from runner.workflow import run
from tests.conftest import compose_cfg


def _nothing_written(run_dir: Path) -> None:
    export = run_dir / "export"
    assert not export.exists() or not [p for p in export.rglob("*") if p.is_file()]
    assert not list(run_dir.glob(".export-source-*"))  # the step's work folder is gone too


# ---- refusals, before anything is written --------------------------------------------------------------------

def test_export_of_a_run_that_registered_nothing_is_refused(tmp_path):
    with pytest.raises(MissingInput, match="nothing to export.*register.*export.model=models:/NAME/VERSION"):
        run(compose_cfg(["steps=[export]"]), run_dir=tmp_path / "run")
    record = load_record(tmp_path / "run")
    assert record["steps"]["export"]["status"] == "failed"
    _nothing_written(tmp_path / "run")


def test_an_unknown_format_is_refused_by_the_config_check(tmp_path):
    with pytest.raises(ConfigError, match="export.formats has unknown format.*'gguf_q2_k'.*gguf_q8_0"):
        run(compose_cfg(["steps=[export]", "export.formats=[merged,gguf_q2_k]"]), run_dir=tmp_path / "run")
    _nothing_written(tmp_path / "run")


def test_a_version_that_was_never_registered_is_refused(tmp_path):
    from runner.local.model_identity import ModelIdentityMismatch

    with pytest.raises(ModelIdentityMismatch, match="models:/never-registered/3 is not in the registry"):
        run(compose_cfg(["steps=[export]", "export.model=models:/never-registered/3"]), run_dir=tmp_path / "run")
    _nothing_written(tmp_path / "run")


def test_a_folder_with_no_trained_model_is_refused(tmp_path):
    from runner.export.errors import ExportError

    empty = tmp_path / "not-a-model"
    empty.mkdir()
    (empty / "notes.txt").write_text("training crashed")
    with pytest.raises(ExportError, match="holds no trained model"):
        run(compose_cfg(["steps=[export]", f"export.model={empty}", "export.formats=[merged]"]),
            run_dir=tmp_path / "run")
    _nothing_written(tmp_path / "run")


def test_a_full_disk_is_refused_before_writing(tiny_model_dir, tmp_path, monkeypatch):
    import runner.export.files as files
    from runner.export.errors import ExportError

    real = shutil.disk_usage
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    with pytest.raises(ExportError, match="not enough disk space for the merged model"):
        run(compose_cfg(["steps=[export]", f"export.model={tiny_model_dir}", "export.formats=[merged]"]),
            run_dir=tmp_path / "run")
    _nothing_written(tmp_path / "run")


def test_an_architecture_the_converter_does_not_cover_is_refused(tiny_model_dir, sdist, tmp_path):
    from runner.export.errors import ExportError
    from tests.export.helpers import model_with_architecture

    model = model_with_architecture(tiny_model_dir, tmp_path, "MadeUpForCausalLM")
    with pytest.raises(ExportError, match="MadeUpForCausalLM"):
        run(compose_cfg(["steps=[export]", f"export.model={model}", "export.formats=[merged,gguf_q8_0]",
                         f"export.converter={sdist}"]), run_dir=tmp_path / "run")
    _nothing_written(tmp_path / "run")


def test_a_plain_folder_exports_its_merged_copy_into_the_run_dir(tiny_model_dir, tmp_path):
    record = run(compose_cfg(["steps=[export]", f"export.model={tiny_model_dir}", "export.formats=[merged]"]),
                 run_dir=tmp_path / "run")
    out = record.output("export")
    merged = Path(out["outputs"]["merged"]["path"])
    assert merged == tmp_path / "run" / "export" / "merged"
    for name, sha in out["outputs"]["merged"]["files"].items():
        assert sha256_file(merged / name) == sha
    assert out.get("logged_to") is None  # a folder belongs to no registered version


# ---- the registered version, end to end on the tiny model ------------------------------------------------------

@pytest.fixture(scope="module")
def registered_run(tmp_path_factory):
    """A run that trained the tiny model a few steps and registered it (its own state root)."""
    import os

    home = tmp_path_factory.mktemp("export-home")
    old = os.environ.get("FTRUN_HOME")
    os.environ["FTRUN_HOME"] = str(home)
    try:
        run_dir = tmp_path_factory.mktemp("export-trained") / "run"
        run(compose_cfg(["steps=[connect,model,compute,data,finetune,register]", "finetune.max_steps=4",
                         "finetune.eval_steps=2"]), run_dir=run_dir)
    finally:
        if old is None:
            os.environ.pop("FTRUN_HOME", None)
        else:
            os.environ["FTRUN_HOME"] = old
    return home, run_dir


@pytest.mark.slow
def test_from_run_exports_the_registered_version_and_logs_it_as_its_artifacts(registered_run, sdist, tmp_path,
                                                                              monkeypatch):
    home, trained = registered_run
    monkeypatch.setenv("FTRUN_HOME", str(home))
    record = run(compose_cfg(["steps=[export]", f"from_run={trained}", f"export.converter={sdist}",
                              "export.check_chats=3"]), run_dir=tmp_path / "run")
    out = record.output("export")
    register = load_record(trained)["steps"]["register"]["outputs"]
    assert out["model_uri"] == register["model_uri"]
    gguf = Path(out["outputs"]["gguf_q8_0"]["path"])
    assert gguf.parent == tmp_path / "run" / "export" / "gguf" and gguf.name.endswith("-q8_0.gguf")
    assert sha256_file(gguf) == out["outputs"]["gguf_q8_0"]["sha256"]
    assert gguf.stat().st_size == out["outputs"]["gguf_q8_0"]["bytes"]
    merged = Path(out["outputs"]["merged"]["path"])
    assert {"model.safetensors", "tokenizer.model", "generation_config.json"} <= set(out["outputs"]["merged"]["files"])
    assert sha256_file(merged / "model.safetensors") == out["outputs"]["merged"]["files"]["model.safetensors"]
    assert "ollama create" in out["ollama_command"] and (gguf.parent / "Modelfile").is_file()
    assert out["checks"]["gguf_q8_0"]["chats"] == 3 and not out["checks"]["gguf_q8_0"]["tokenization_mismatches"]

    # the artifacts of the registered version's MLflow run hold the same bytes
    from runner.local.registry import local_artifact_dir
    from runner.local.tracking import mlflow_client

    cfg = compose_cfg()
    client = mlflow_client(cfg.mlflow.tracking_uri)
    run_id = client.get_model_version(*register["model_uri"][len("models:/"):].rsplit("/", 1)).run_id
    assert out["logged_to"] == run_id
    logged = local_artifact_dir(client.get_run(run_id).info.artifact_uri) / "export" / "gguf" / gguf.name
    assert sha256_file(logged) == out["outputs"]["gguf_q8_0"]["sha256"]


@pytest.mark.slow
def test_export_model_names_a_registered_version_without_a_record(registered_run, sdist, tmp_path, monkeypatch):
    home, trained = registered_run
    monkeypatch.setenv("FTRUN_HOME", str(home))
    uri = load_record(trained)["steps"]["register"]["outputs"]["model_uri"]
    record = run(compose_cfg(["steps=[export]", f"export.model={uri}", f"export.converter={sdist}",
                              "export.formats=[gguf_f16]", "export.check_chats=0", "export.name=mine"]),
                 run_dir=tmp_path / "run")
    out = record.output("export")
    assert list(out["outputs"]) == ["gguf_f16"] and Path(out["outputs"]["gguf_f16"]["path"]).name == "mine-f16.gguf"
    assert out["model_uri"] == uri and out["logged_to"]


@pytest.mark.slow
def test_a_registered_version_whose_files_changed_is_refused_before_export(registered_run, tmp_path, monkeypatch):
    from runner.local.model_identity import ModelIdentityMismatch, model_folder

    home, trained = registered_run
    monkeypatch.setenv("FTRUN_HOME", str(home))
    copy = tmp_path / "trained-copy"
    shutil.copytree(trained, copy)
    record = json.loads((copy / "run_record.json").read_text())
    record["steps"]["register"]["outputs"]["model_sha256"] = "0" * 64  # what another model's files would give
    (copy / "run_record.json").write_text(json.dumps(record))
    with pytest.raises(ModelIdentityMismatch, match="changed since"):
        run(compose_cfg(["steps=[export]", f"from_run={copy}", "export.formats=[merged]"]),
            run_dir=tmp_path / "run")
    _nothing_written(tmp_path / "run")
    folder = model_folder(compose_cfg().mlflow.tracking_uri, record["steps"]["register"]["outputs"]["model_uri"])
    assert not (folder["folder"] / "export").exists()


# ---- azureml: planned in the dry run, downloaded with models.download through the SDK-built double ---------------

def test_azureml_dry_run_plans_the_download_and_the_export(tmp_path):
    cfg = compose_cfg(["experiment=phi3_ultrachat", "dry_run=true"])
    run(cfg, run_dir=tmp_path / "run")
    import yaml

    plan = yaml.safe_load((tmp_path / "run" / "plan" / "export.yaml").read_text())
    register = load_record(tmp_path / "run")["steps"]["register"]["outputs"]
    assert plan["model"] == register["model_uri"]
    assert plan["download"]["call"] == "models.download" and plan["download"]["name"] == register["name"]
    assert plan["download"]["version"] == register["version"]
    assert plan["formats"] == ["merged", "gguf_q8_0"] and plan["out_dir"] == str(tmp_path / "run" / "export")
    assert not (tmp_path / "run" / "export").exists()


def _mlflow_shaped(tiny_model_dir: Path, dest: Path) -> Path:
    """The files of a registered MLflow model as Azure ML stores them: weights under data/model, the tokenizer
    under data/tokenizer, MLmodel at the top."""
    (dest / "data" / "model").mkdir(parents=True)
    (dest / "data" / "tokenizer").mkdir(parents=True)
    (dest / "MLmodel").write_text("flavors: {}\n")
    for item in tiny_model_dir.iterdir():
        tokenizer_file = item.name.startswith("tokenizer") or item.name in ("special_tokens_map.json",
                                                                            "chat_template.jinja")
        shutil.copy2(item, dest / "data" / ("tokenizer" if tokenizer_file else "model") / item.name)
    return dest


def test_azureml_export_downloads_the_registered_version_and_exports_it(tiny_model_dir, tmp_path, monkeypatch):
    from azure.ai.ml.entities import Model
    from mlflow.tracking import MlflowClient

    from runner.azureml.backend import AzureMLBackend
    from tests.azureml.double import AzureWorld
    from tests.azureml.test_backend import WS_IDS

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=uri)
    job = client.create_run(client.create_experiment("e")).info.run_id  # the pipeline job's MLflow run
    path = f"azureml://jobs/{job}/outputs/trained_model"
    world = AzureWorld(job_name=job, tracking_uri=uri)
    world.workspace_models["ft-model"] = [Model(name="ft-model", version="7", path=path, type="mlflow_model")]
    world.model_files[("ft-model", "7")] = _mlflow_shaped(tiny_model_dir, tmp_path / "trained_model")
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    register = {"model_uri": "azureml:ft-model:7", "name": "ft-model", "version": "7", "source": path}
    (earlier / "run_record.json").write_text(json.dumps({"run_dir": str(earlier), "backend": "azureml", "steps": {
        "register": {"status": "ok", "outputs": register}}}))
    overrides = ["experiment=phi3_ultrachat", "model.allow_archived=true", f"backend.config_path={tmp_path / 'x'}",
                 *WS_IDS, "steps=[connect,export]", f"from_run={earlier}", "export.formats=[merged]"]
    cfg = compose_cfg(overrides)
    record = run(cfg, run_dir=tmp_path / "run", backend=AzureMLBackend(cfg, clients=world.clients()))

    download = world.find("workspace.models.download")
    assert len(download) == 1 and download[0].kwargs["name"] == "ft-model" and download[0].kwargs["version"] == "7"
    out = record.output("export")
    merged = Path(out["outputs"]["merged"]["path"])
    assert merged == tmp_path / "run" / "export" / "merged"
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= {p.name for p in merged.iterdir()}
    assert "MLmodel" not in {p.name for p in merged.iterdir()}
    assert out["logged_to"] == job
    logged = Path(client.get_run(job).info.artifact_uri.replace("file://", "")) / "export" / "merged"
    assert sha256_file(logged / "model.safetensors") == out["outputs"]["merged"]["files"]["model.safetensors"]


def test_azureml_export_refuses_a_version_registered_again_for_another_job(tiny_model_dir, tmp_path):
    from azure.ai.ml.entities import Model

    from runner.azureml.backend import AzureMLBackend
    from runner.azureml.export_source import RegisteredModelChanged
    from tests.azureml.double import AzureWorld
    from tests.azureml.test_backend import WS_IDS

    world = AzureWorld()
    world.workspace_models["ft-model"] = [Model(name="ft-model", version="7", type="mlflow_model",
                                                path="azureml://jobs/other_job/outputs/trained_model")]
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    register = {"model_uri": "azureml:ft-model:7", "name": "ft-model", "version": "7",
                "source": "azureml://jobs/our_job/outputs/trained_model"}
    (earlier / "run_record.json").write_text(json.dumps({"run_dir": str(earlier), "backend": "azureml", "steps": {
        "register": {"status": "ok", "outputs": register}}}))
    cfg = compose_cfg(["experiment=phi3_ultrachat", "model.allow_archived=true",
                       f"backend.config_path={tmp_path / 'x'}", *WS_IDS, "steps=[connect,export]", f"from_run={earlier}", "export.formats=[merged]"])
    with pytest.raises(RegisteredModelChanged, match="other_job.*our_job"):
        run(cfg, run_dir=tmp_path / "run", backend=AzureMLBackend(cfg, clients=world.clients()))
    assert not world.find("workspace.models.download")
    _nothing_written(tmp_path / "run")


def test_local_dry_run_plans_the_export(tmp_path):
    import yaml

    run(compose_cfg(["dry_run=true", "export.formats=[gguf_f16]"]), run_dir=tmp_path / "run")
    plan = yaml.safe_load((tmp_path / "run" / "plan" / "plan.yaml").read_text())
    assert "export" in plan["steps"] and plan["export"]["formats"] == ["gguf_f16"]
    assert "register step" in plan["export"]["model"] and not (tmp_path / "run" / "export").exists()
