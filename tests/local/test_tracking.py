"""MLflow tracking through an explicit-URI client: params/metrics round trip, artifacts under the configured
location (never ./mlruns), run lookup by tags, and the global tracking URI left alone."""

import os
from pathlib import Path

import pytest

from runner.local import tracking


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store per module: creating its tables costs seconds, a run in it milliseconds."""
    root = tmp_path_factory.mktemp("mlflow")
    return {"uri": f"sqlite:///{root}/mlflow.db", "artifacts": root / "artifacts", "root": root}


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def new_run(store, experiment="exp", **kw):
    args = dict(tracking_uri=store["uri"], experiment_name=experiment, artifact_location=str(store["artifacts"]),
                run_name="tiny-run", params={}, tags={})
    args.update(kw)
    return tracking.start_run(**args)


def test_params_tags_and_metrics_round_trip(store, in_tmp_cwd):
    from mlflow.tracking import MlflowClient

    params = {"learning_rate": 2e-5, "apply_lora": True, "lora_target_modules": ["qkv_proj", "o_proj"],
              "deepspeed": None, "local": {"packing": True, "save_steps": 50}, "long": "x" * 7000}
    run_id = new_run(store, params=params, tags={"display_name": "tiny-ft", "base_model": "tiny_phi3"})
    log_fn = tracking.metric_logger(store["uri"], run_id)
    log_fn({"train_loss": 7.5, "learning_rate": 2e-5, "tokens_per_s": 1234, "epoch": "1/3", "flag": True}, 1)
    log_fn({"train_loss": 6.0, "learning_rate": 1e-5}, 2)
    log_fn({"eval_loss": 6.5, "perplexity": 665.1}, 2)
    tracking.end_run(store["uri"], run_id, status="FINISHED")

    run = MlflowClient(store["uri"]).get_run(run_id)
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["learning_rate"] == "2e-05" and p["apply_lora"] == "True" and p["deepspeed"] == "None"
    assert p["lora_target_modules"] == '["qkv_proj", "o_proj"]'
    assert p["local.packing"] == "True" and p["local.save_steps"] == "50"  # nested keys flattened
    assert len(p["long"]) == tracking.MAX_PARAM_VALUE and p["long"].endswith("...")  # truncated, not refused
    assert run.data.tags["display_name"] == "tiny-ft"

    history = tracking.metric_history(store["uri"], run_id)
    assert history["train_loss"] == [[1, 7.5], [2, 6.0]]
    assert history["eval_loss"] == [[2, 6.5]]
    assert history["tokens_per_s"] == [[1, 1234.0]]
    assert "epoch" not in history and "flag" not in history  # non-numeric values are skipped, not fatal
    assert not (in_tmp_cwd / "mlruns").exists()


def test_artifacts_land_in_the_configured_location_not_in_cwd_mlruns(store, in_tmp_cwd):
    run_id = new_run(store, experiment="artifacts")
    resolved = in_tmp_cwd / "resolved_config.yaml"
    resolved.write_text("finetune:\n  learning_rate: 2e-5\n")
    folder = in_tmp_cwd / "metrics"
    folder.mkdir()
    (folder / "loss_curve.png").write_bytes(b"\x89PNG fake")
    tracking.log_artifact(store["uri"], run_id, str(resolved))
    tracking.log_artifact(store["uri"], run_id, str(folder), artifact_path="metrics")
    tracking.end_run(store["uri"], run_id)

    run_dir = Path(store["artifacts"]) / run_id / "artifacts"  # the experiment's location holds its runs
    assert (run_dir / "resolved_config.yaml").read_text().startswith("finetune:")
    assert (run_dir / "metrics" / "loss_curve.png").is_file()
    assert not (in_tmp_cwd / "mlruns").exists() and not Path("mlruns").exists()


def test_a_resumed_run_keeps_the_latest_value_per_step(store):
    run_id = new_run(store)
    log_fn = tracking.metric_logger(store["uri"], run_id)
    for step, loss in [(1, 5.0), (2, 4.0), (3, 3.5)]:
        log_fn({"train_loss": loss}, step)
    for step, loss in [(3, 3.4), (4, 3.0)]:  # restarted from the step-2 checkpoint, step 3 logged again
        log_fn({"train_loss": loss}, step)
    assert tracking.metric_history(store["uri"], run_id)["train_loss"] == [[1, 5.0], [2, 4.0], [3, 3.4], [4, 3.0]]


def test_metric_logger_survives_a_broken_store(store, caplog):
    run_id = "0" * 32  # no such run: every log_batch fails
    log_fn = tracking.metric_logger(store["uri"], run_id)
    log_fn({"train_loss": 1.0}, 1)  # must not raise
    assert log_fn.failures["n"] == 1
    assert "MLflow metric logging failed" in caplog.text


def test_find_run_by_tags_and_status_values(store):
    first = new_run(store, experiment="lookup", tags={"training_key": "abc", "config_sha256": "1"})
    second = new_run(store, experiment="lookup", tags={"training_key": "abc", "config_sha256": "2"})
    quoted = new_run(store, experiment="lookup", tags={"training_key": "it's"})
    assert tracking.find_run(store["uri"], "lookup", {"training_key": "abc"}) == second  # newest first
    assert tracking.find_run(store["uri"], "lookup", {"training_key": "abc", "config_sha256": "1"}) == first
    assert tracking.find_run(store["uri"], "lookup", {"training_key": "it's"}) == quoted
    assert tracking.find_run(store["uri"], "lookup", {"training_key": "zzz"}) is None
    assert tracking.find_run(store["uri"], "no-such-experiment", {"training_key": "abc"}) is None
    tracking.end_run(store["uri"], first, status="KILLED")
    with pytest.raises(ValueError, match="FINISHED, FAILED or KILLED"):
        tracking.end_run(store["uri"], second, status="DONE")


def test_global_tracking_uri_is_left_alone(store, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = mlflow.get_tracking_uri()
    run_id = new_run(store, experiment="global")
    tracking.metric_logger(store["uri"], run_id)({"train_loss": 1.0}, 1)
    tracking.end_run(store["uri"], run_id)
    assert mlflow.get_tracking_uri() == before
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_existing_experiment_keeps_its_location_and_says_so(store, tmp_path, caplog):
    new_run(store, experiment="fixed-location")
    other = tmp_path / "elsewhere"
    run_id = new_run(store, experiment="fixed-location", artifact_location=str(other))
    tracking.log_artifact(store["uri"], run_id, __file__)
    assert (Path(store["artifacts"]) / run_id / "artifacts" / Path(__file__).name).is_file()
    assert not other.exists()
    assert "already stores its artifacts" in caplog.text
