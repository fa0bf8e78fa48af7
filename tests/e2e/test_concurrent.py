"""Two full runs of the README's default command started at the same moment on one fresh state root: both succeed,
each with its own run dir, training folder, metrics, registered version and endpoint."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _rows(metrics_file):
    return [json.loads(line) for line in Path(metrics_file).read_text().splitlines()]


def test_two_full_runs_at_once_on_one_fresh_state_root(tmp_path, ftrun_home, sdist):
    assert not ftrun_home.exists()  # fresh: no MLflow store, no tiny model, no data yet
    env = {**os.environ, "FTRUN_HOME": str(ftrun_home), "PYTHONPATH": str(REPO)}
    # both extract the converter's sdist into one cache
    # The defaults, shrunk only in length (as test_e2e_local does), the same command for both, no run dir given.
    cmd = [sys.executable, "-m", "runner.cli", "finetune.max_steps=12", "finetune.eval_steps=6",
           "evaluate.max_rows=8", "evaluate.max_new_tokens=16",  # the evaluate step kept short
           f"export.converter={sdist}"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=1200)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n=====\n\n".join(o[-5000:] for o in outputs)

    run_dirs = sorted(p.parent for p in (tmp_path / "outputs").glob("*/*/run_record.json"))
    assert len(run_dirs) == 2  # one run dir each
    records = [json.loads((d / "run_record.json").read_text()) for d in run_dirs]
    assert all(r["status"] == "ok" for r in records)
    ft = [r["steps"]["finetune"]["outputs"] for r in records]
    reg = [r["steps"]["register"]["outputs"] for r in records]
    dep = [r["steps"]["deploy"]["outputs"] for r in records]
    # each exported its own registered version into its own run dir
    exported = [r["steps"]["export"]["outputs"] for r in records]
    assert [e["model_uri"] for e in exported] == [r["model_uri"] for r in reg]
    assert all(e["out_dir"] == str(d / "export") for e, d in zip(exported, run_dirs))

    # distinct registered versions of one model
    assert reg[0]["name"] == reg[1]["name"] and {reg[0]["version"], reg[1]["version"]} == {1, 2}
    # one training identity, two training folders
    assert ft[0]["training_key"] == ft[1]["training_key"]
    assert ft[0]["training_dir"] != ft[1]["training_dir"]
    assert all(Path(f["final_model_dir"]).parent == Path(f["training_dir"]) for f in ft)
    assert ft[0]["mlflow_run_id"] != ft[1]["mlflow_run_id"]

    # each run's metrics intact: its own rows only, none lost, the same steps MLflow holds for its run
    from runner.local import tracking

    uri = f"sqlite:///{ftrun_home}/mlflow.db"
    for f in ft:
        assert Path(f["metrics_file"]).parent == Path(f["training_dir"])
        rows = _rows(f["metrics_file"])
        train_steps = [r["step"] for r in rows if r["kind"] == "train"]
        eval_steps = [r["step"] for r in rows if r["kind"] == "eval"]
        assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 12  # no duplicate, none from the other
        assert eval_steps == [0, 6, 12]
        assert [r["kind"] for r in rows].count("summary") == 1
        history = tracking.metric_history(uri, f["mlflow_run_id"])
        assert [int(step) for step, _ in history["train_loss"]] == train_steps
        assert [int(step) for step, _ in history["eval_loss"]] == eval_steps
        assert f["global_step"] == 12 and f["eval_loss"] < f["eval_loss_before"]

    # distinct endpoints, each stopped by its own run's cleanup (key and state files gone, ports free)
    assert dep[0]["name"] != dep[1]["name"] and dep[0]["instance"] != dep[1]["instance"]
    assert dep[0]["key_file"] != dep[1]["key_file"]
    for d, r in zip(dep, records):
        assert r["steps"]["cleanup"]["outputs"]["how"] == "terminated"
        assert not os.path.exists(d["key_file"])
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", d["port"])) != 0
    assert not list((ftrun_home / "endpoints").glob("*.json"))
    for out in outputs:
        assert "Traceback" not in out
