"""All state hangs off one root that does not move with the directory `ftrun` is started from."""

import os
import subprocess
import sys

import yaml

from tests.conftest import REPO


def resolved_paths(cwd, **env_changes):
    env = {k: v for k, v in os.environ.items() if k != "FTRUN_HOME"}
    env.update(env_changes)
    proc = subprocess.run([sys.executable, "-m", "runner.cli", "--cfg", "job", "--resolve"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    return cfg["paths"], cfg["mlflow"]


def test_state_root_is_the_checkout_whatever_the_working_directory(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    from_repo, mlflow_repo = resolved_paths(REPO)
    from_elsewhere, mlflow_elsewhere = resolved_paths(tmp_path / "elsewhere")
    assert from_repo == from_elsewhere
    assert from_repo["root"] == str(REPO / ".ftrun")
    assert mlflow_repo["tracking_uri"] == mlflow_elsewhere["tracking_uri"] == f"sqlite:///{REPO}/.ftrun/mlflow.db"


def test_ftrun_home_overrides_and_is_made_absolute(tmp_path):
    paths, mlflow = resolved_paths(tmp_path, FTRUN_HOME="state")
    assert paths["root"] == str(tmp_path / "state")
    assert paths["data_dir"] == str(tmp_path / "state" / "data")
    assert mlflow["artifact_location"] == str(tmp_path / "state" / "mlartifacts")
