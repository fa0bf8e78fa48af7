"""The quality gate before register, and a deploy that names no run: a diverged or untrained model is never
registered by mistake, and `steps=[deploy]` without from_run serves only a version a successful run made."""

import json
import os
import subprocess
import sys

import pytest

from runner.local import registry, tracking
from runner.steps.register import RegisterRefused, nonfinite_reason, untrained_reason
from tests.conftest import REPO

NAME = "gate-model"


# ---- the gate's rules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("facts, expected", [
    (dict(global_step=12, max_steps="12", warmup_steps="0", lr_scheduler_type="linear"), None),
    (dict(global_step=0, max_steps="-1", warmup_steps="0", lr_scheduler_type="linear"), "no optimizer step"),
    (dict(global_step=1, max_steps="0", warmup_steps="0", lr_scheduler_type="linear"), "finetune.max_steps=0"),
    (dict(global_step=1, max_steps="1", warmup_steps="5", lr_scheduler_type="linear"), "learning rate 0"),
    (dict(global_step=1, max_steps="1", warmup_steps="5", lr_scheduler_type="constant"), None),  # no warmup there
    (dict(global_step=2, max_steps="2", warmup_steps="5", lr_scheduler_type="linear"), None),  # step 2 had lr > 0
    (dict(global_step=None, max_steps=None, warmup_steps=None, lr_scheduler_type=None), None),  # Azure: unknown
])
def test_untrained_means_no_optimizer_step_at_a_non_zero_learning_rate(facts, expected):
    reason = untrained_reason(**facts)
    assert (reason is None) if expected is None else (expected in reason)


def test_a_nan_or_infinite_final_loss_is_a_diverged_run():
    assert "eval_loss is nan" in nonfinite_reason({"eval_loss": float("nan"), "train_loss": 5.1})
    assert "train_loss is inf" in nonfinite_reason({"eval_loss": None, "train_loss": float("inf")})
    assert nonfinite_reason({"eval_loss": 2.5, "train_loss": 2.4}) is None
    assert nonfinite_reason({}) is None


def test_a_refusal_is_recorded_as_refused_with_its_reason(tmp_path):
    from runner.record import RunRecord, load_record

    record = RunRecord(tmp_path, backend="local", config_sha256="x")
    record.start("register")
    record.fail("register", RegisterRefused("quality gate: its final eval_loss is nan"))
    step = load_record(tmp_path)["steps"]["register"]
    assert step["status"] == "refused" and "eval_loss is nan" in step["reason"]
    assert load_record(tmp_path)["status"] == "failed"


# ---- which version a deploy without from_run may take ---------------------------------------------------------


def _version(store, *, status="FINISHED", gate="passed"):
    """A registered version made by an MLflow run that ended with `status`, tagged with the gate's verdict."""
    from mlflow.tracking import MlflowClient

    run_id = tracking.start_run(tracking_uri=store, experiment_name="gate", artifact_location=None, run_name="r",
                                params={}, tags={})
    tracking.end_run(store, run_id, status=status)
    client = MlflowClient(store, registry_uri=store)
    try:
        client.create_registered_model(NAME)
    except Exception:
        pass
    tags = {"mlflow_run_id": run_id, **({"quality_gate": gate} if gate is not None else {})}
    source = client.get_run(run_id).info.artifact_uri + "/model"
    return client.create_model_version(NAME, source=source, run_id=run_id, tags=tags)


@pytest.fixture
def store(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


def test_the_latest_version_of_a_successful_run_is_deployable(store):
    _version(store, gate="allowed: finetune.max_steps=0")
    _version(store)
    chosen = registry.deployable_latest(store, NAME)
    assert chosen["version"] == 2 and chosen["model_uri"] == f"models:/{NAME}/2"
    assert chosen["quality_gate"] == "passed"


@pytest.mark.parametrize("status, gate, must_say", [
    ("FAILED", "passed", "is FAILED, not FINISHED"),
    ("KILLED", "passed", "is KILLED, not FINISHED"),
    ("FINISHED", "allowed: finetune.max_steps=0", "did not pass the quality gate (quality_gate: allowed: finetune"),
    ("FINISHED", None, "did not pass the quality gate (quality_gate: not recorded)"),
])
def test_the_latest_version_is_refused_unless_a_successful_run_made_it(store, status, gate, must_say):
    _version(store)  # an older good version is not silently picked instead
    _version(store, status=status, gate=gate)
    with pytest.raises(registry.NotDeployable) as info:
        registry.deployable_latest(store, NAME)
    assert f"the latest version models:/{NAME}/2 is not deployed" in str(info.value)
    assert must_say in str(info.value) and "from_run=" in str(info.value)


def test_no_version_at_all_is_refused(store):
    with pytest.raises(registry.NotDeployable, match="no version of 'gate-model'"):
        registry.deployable_latest(store, NAME)


# ---- through ftrun, on the tiny model ------------------------------------------------------------------------


def ftrun(home, *args, timeout=600):
    env = {**os.environ, "FTRUN_HOME": str(home), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _record(run_dir):
    return json.loads((run_dir / "run_record.json").read_text())


def _versions(home, name="tiny-phi3-sample"):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{home}/mlflow.db"
    return MlflowClient(uri, registry_uri=uri).search_model_versions(f"name='{name}'")


SHORT = ("finetune.evaluation_strategy=steps", "finetune.eval_steps=2")


@pytest.mark.slow
def test_a_diverged_run_is_not_registered(tmp_path, ftrun_home):
    """learning_rate=1e10 is in range (a bad idea, not an impossible value): the run trains to eval loss NaN, and the
    gate keeps it out of the registry."""
    run_dir = tmp_path / "run"
    proc = ftrun(ftrun_home, "steps=[model,data,finetune,register]", "finetune.learning_rate=1e10",
                 "finetune.max_steps=4", *SHORT, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "quality gate: the model is not registered: its final eval_loss is nan" in proc.stderr
    record = _record(run_dir)
    assert record["steps"]["finetune"]["status"] == "ok"
    register = record["steps"]["register"]
    assert register["status"] == "refused" and "eval_loss is nan" in register["reason"]
    assert record["status"] == "failed" and record["error"]["step"] == "register"
    assert _versions(ftrun_home) == []  # nothing in the MLflow registry


@pytest.mark.slow
def test_an_untrained_model_is_refused_registered_only_when_allowed_and_never_deployed_implicitly(tmp_path, ftrun_home):
    train = tmp_path / "train"
    proc = ftrun(ftrun_home, "steps=[model,data,finetune,register]", "finetune.max_steps=0",
                 "finetune.local.eval_before_training=false", f"hydra.run.dir={train}")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "finetune.max_steps=0" in proc.stderr and "register.allow_untrained=true" in proc.stderr
    assert _record(train)["steps"]["register"]["status"] == "refused"
    assert _versions(ftrun_home) == []

    # the opt-out registers it, tagged with what it let through
    allowed = ftrun(ftrun_home, "steps=[register]", f"from_run={train}", "register.allow_untrained=true",
                    f"hydra.run.dir={tmp_path / 'allowed'}")
    assert allowed.returncode == 0, allowed.stdout[-3000:] + allowed.stderr[-3000:]
    register = _record(tmp_path / "allowed")["steps"]["register"]["outputs"]
    assert register["quality_gate"].startswith("allowed: finetune.max_steps=0")
    [version] = _versions(ftrun_home)
    assert version.tags["quality_gate"].startswith("allowed:")

    # steps=[deploy] naming no run does not take it
    deploy = ftrun(ftrun_home, "steps=[deploy]", "endpoint_name=gate-untrained", f"hydra.run.dir={tmp_path / 'dep'}")
    assert deploy.returncode == 2, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    assert "the latest version models:/tiny-phi3-sample/1 is not deployed" in deploy.stderr
    assert "did not pass the quality gate" in deploy.stderr
    assert _record(tmp_path / "dep")["steps"]["deploy"]["status"] == "failed"


@pytest.mark.slow
def test_deploy_without_from_run_names_the_version_it_serves(tmp_path, ftrun_home):
    train = tmp_path / "train"
    proc = ftrun(ftrun_home, "steps=[model,data,finetune,register]", "finetune.max_steps=2",
                 "finetune.evaluation_strategy=disable", "finetune.local.eval_before_training=false",
                 f"hydra.run.dir={train}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _record(train)["steps"]["register"]["outputs"]["quality_gate"] == "passed"
    [version] = _versions(ftrun_home)
    assert version.tags["quality_gate"] == "passed"

    dep = tmp_path / "dep"
    deploy = ftrun(ftrun_home, "steps=[deploy]", "endpoint_name=gate-implicit", f"hydra.run.dir={dep}")
    try:
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        assert f"deploying the latest version models:/tiny-phi3-sample/1 (MLflow run {version.run_id}" in deploy.stdout
        outputs = _record(dep)["steps"]["deploy"]["outputs"]
        assert (outputs["model_uri"], outputs["model_version"]) == ("models:/tiny-phi3-sample/1", 1)
    finally:
        ftrun(ftrun_home, "steps=[cleanup]", "endpoint_name=gate-implicit", f"hydra.run.dir={tmp_path / 'clean'}")
