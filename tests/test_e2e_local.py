"""The README's main command, end to end on the local backend: all ten steps, the fine-tuned model's reply."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_whole_workflow_on_the_local_defaults(tmp_path, ftrun_home):
    run_dir = tmp_path / "run"
    env = {**os.environ, "FTRUN_HOME": str(ftrun_home)}
    # The defaults, shrunk only in length: a few optimizer steps instead of three epochs.
    proc = subprocess.run(
        [sys.executable, "-m", "runner.cli", "finetune.max_steps=12", "finetune.eval_steps=6",
         f"hydra.run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    record = json.loads((run_dir / "run_record.json").read_text())
    assert record["status"] == "ok"
    assert list(record["steps"]) == ["connect", "model", "compute", "data", "finetune", "metrics", "register",
                                     "deploy", "test", "cleanup"]
    assert all(step["status"] == "ok" for step in record["steps"].values())

    reply = record["steps"]["test"]["outputs"]["reply"]
    assert isinstance(reply, str) and reply.strip()
    assert "[assistant (fine-tuned)]" in proc.stdout and reply.strip()[:20] in proc.stdout
    request = json.loads((run_dir / "sample_score.json").read_text())
    assert request["input_data"]["input_string"][0][-1]["role"] == "user"

    finetune = record["steps"]["finetune"]["outputs"]
    assert finetune["global_step"] == 12
    assert finetune["eval_loss"] < finetune["eval_loss_before"]
    assert os.path.exists(record["steps"]["metrics"]["outputs"]["plot"])
    assert record["steps"]["register"]["outputs"]["model_uri"].startswith("models:/tiny-phi3-ultrachat-200k/")

    # cleanup deleted the endpoint: nothing listens on its port any more, the key file is gone
    deploy = record["steps"]["deploy"]["outputs"]
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", deploy["port"])) != 0
    assert not os.path.exists(deploy["key_file"])
    assert "Summary" in proc.stdout and "sample reply" in proc.stdout
