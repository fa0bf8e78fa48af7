"""The register step on the tiny model: a chat-task MLflow model that answers messages, lineage tags on the version,
and idempotent registration per run."""

from pathlib import Path

import pytest

from runner.local import registry, tracking

pytestmark = pytest.mark.slow  # saves and loads the tiny model through MLflow (a few seconds each)

NAME = "tiny_phi3-ultrachat-200k"
LINEAGE = {"base_model": "tiny_phi3", "data_manifest_sha256": "ab" * 32, "config_sha256": "cd" * 32,
           "display_name": "tiny_phi3-ultrachat-lora-r8"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    return {"uri": f"sqlite:///{root}/mlflow.db", "artifacts": root / "artifacts"}


def finished_run(store, name="ft"):
    run_id = tracking.start_run(tracking_uri=store["uri"], experiment_name="registry",
                                artifact_location=str(store["artifacts"]), run_name=name, params={}, tags={})
    tracking.end_run(store["uri"], run_id)
    return run_id


@pytest.fixture(scope="module")
def registered(store, tiny_model_dir, tmp_path_factory):
    """Run A registered once, then again (a retry), then run B; in a CWD of its own to catch ./mlruns."""
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        run_a, run_b = finished_run(store, "a"), finished_run(store, "b")
        kw = dict(tracking_uri=store["uri"], model_dir=str(tiny_model_dir), registered_name=NAME,
                  description="tiny_phi3 fine tuned model for ultrachat 200k chat-completion")
        first = registry.register_model(run_id=run_a, tags={**LINEAGE, "mlflow_run_id": run_a}, **kw)
        retry = registry.register_model(run_id=run_a, tags={**LINEAGE, "mlflow_run_id": run_a}, **kw)
        other = registry.register_model(run_id=run_b, tags=LINEAGE, **kw)
    return {"a": run_a, "b": run_b, "first": first, "retry": retry, "other": other, "cwd": cwd}


def test_first_registration_makes_version_1_with_lineage_tags(registered, store):
    from mlflow.tracking import MlflowClient

    first = registered["first"]
    assert (first["name"], first["version"], first["reused"]) == (NAME, 1, False)
    assert first["model_uri"] == f"models:/{NAME}/1"
    version = MlflowClient(store["uri"], registry_uri=store["uri"]).get_model_version(NAME, "1")
    assert version.run_id == registered["a"]
    for key, value in {**LINEAGE, "mlflow_run_id": registered["a"]}.items():
        assert version.tags[key] == value
    assert "ultrachat 200k" in version.description
    # the model lives in the run's artifacts under the configured location, not in ./mlruns
    assert Path(store["artifacts"], registered["a"], "artifacts", "model", "MLmodel").is_file()
    assert not (registered["cwd"] / "mlruns").exists()


def test_retry_for_the_same_run_reuses_the_version(registered, store):
    retry = registered["retry"]
    assert (retry["version"], retry["reused"]) == (1, True)
    assert retry["model_uri"] == registered["first"]["model_uri"]


def test_another_run_makes_version_2_and_run_id_is_always_tagged(registered, store):
    other = registered["other"]
    assert (other["version"], other["reused"]) == (2, False)
    assert other["tags"]["mlflow_run_id"] == registered["b"]  # added even when the caller's tags lack it
    latest = registry.latest_version(store["uri"], NAME)
    assert latest["version"] == 2 and latest["run_id"] == registered["b"]
    assert registry.latest_version(store["uri"], "no-such-model") is None


def test_registered_version_answers_chat_messages(registered, store):
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    with _use_tracking_uri(store["uri"]):  # models:/ resolves through the process-wide URI; scope it to this test
        model = mlflow.pyfunc.load_model(registered["first"]["model_uri"])
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Name a fruit."}]
    reply = model.predict({"messages": messages, "max_tokens": 8})
    completion = reply[0] if isinstance(reply, list) else reply
    assert completion["object"] == "chat.completion"
    message = completion["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"].strip()
    assert 0 < completion["usage"]["completion_tokens"] <= 8
    # greedy by default: the same request gives the same reply, and temperature=0.0 does not raise
    again = model.predict({"messages": messages, "max_tokens": 8, "temperature": 0.0})
    assert (again[0] if isinstance(again, list) else again)["choices"][0]["message"]["content"] == message["content"]
    requirements = Path(store["artifacts"], registered["a"], "artifacts", "model", "requirements.txt").read_text()
    assert "torch==" in requirements and "transformers==" in requirements and "+cpu" not in requirements


def test_saved_model_from_an_interrupted_attempt_is_reused(store, tiny_model_dir):
    """A crash between saving the model and creating the version: the retry registers the saved folder."""
    from mlflow.tracking import MlflowClient

    run_id = finished_run(store, "crashed")
    client = MlflowClient(store["uri"], registry_uri=store["uri"])
    source = registry._log_model(client, run_id, str(tiny_model_dir), NAME + "-crash")
    mlmodel = Path(store["artifacts"], run_id, "artifacts", "model", "MLmodel")
    stamp = mlmodel.stat().st_mtime_ns
    out = registry.register_model(tracking_uri=store["uri"], run_id=run_id, model_dir=str(tiny_model_dir),
                                  registered_name=NAME + "-crash", tags={})
    assert (out["version"], out["reused"], out["source"]) == (1, False, source)
    assert mlmodel.stat().st_mtime_ns == stamp  # not saved a second time
    assert not [p for p in mlmodel.parent.parent.iterdir() if p.name.startswith(".model-")]  # no staging left


def test_a_folder_that_is_not_a_model_is_refused(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        registry.register_model(tracking_uri=store["uri"], run_id="0" * 32, model_dir=str(tmp_path),
                                registered_name=NAME, tags={})
