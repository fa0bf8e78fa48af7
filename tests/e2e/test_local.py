"""The README's main command, end to end on the local backend: all twelve steps, the evaluate step's verdict, the
export's files, the fine-tuned model's reply."""

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_whole_workflow_on_the_local_defaults(tmp_path, ftrun_home, sdist):
    run_dir = tmp_path / "run"
    env = {**os.environ, "FTRUN_HOME": str(ftrun_home)}
    # llama.cpp's converter from the pinned sdist pytest caches (ftrun itself fetches it with pip on first use)
    # The defaults, shrunk only in length: a few optimizer steps instead of three epochs.
    # test.rows: the endpoint also answers 4 of the evaluate step's rows (its replies must equal evaluate's)
    proc = subprocess.run(
        [sys.executable, "-m", "runner.cli", "finetune.max_steps=12", "finetune.eval_steps=6",
         "evaluate.max_rows=16", "evaluate.max_new_tokens=24", "test.rows=4", f"export.converter={sdist}",
         f"hydra.run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    record = json.loads((run_dir / "run_record.json").read_text())
    assert record["status"] == "ok"
    assert list(record["steps"]) == ["connect", "model", "compute", "data", "finetune", "metrics", "evaluate",
                                     "register", "export", "deploy", "test", "cleanup"]
    assert all(step["status"] == "ok" for step in record["steps"].values())
    _check_evaluation(record, run_dir, proc.stdout)

    reply = record["steps"]["test"]["outputs"]["reply"]
    assert isinstance(reply, str) and reply.strip()
    assert "[assistant (fine-tuned)]" in proc.stdout and reply.strip()[:20] in proc.stdout
    request = json.loads((run_dir / "sample_score.json").read_text())
    assert request["input_data"]["input_string"][0][-1]["role"] == "user"

    finetune = record["steps"]["finetune"]["outputs"]
    assert finetune["global_step"] == 12
    assert finetune["eval_loss"] < finetune["eval_loss_before"]
    assert os.path.exists(record["steps"]["metrics"]["outputs"]["plot"])
    assert record["steps"]["register"]["outputs"]["model_uri"].startswith("models:/tiny-phi3-sample/")  # named after the data used

    # cleanup deleted the endpoint: nothing listens on its port any more, the key file is gone
    deploy = record["steps"]["deploy"]["outputs"]
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", deploy["port"])) != 0
    assert not os.path.exists(deploy["key_file"])
    assert "Summary" in proc.stdout and "sample reply" in proc.stdout

    # the export: the merged folder and a q8_0 GGUF under the run dir, their paths and sizes printed
    export = record["steps"]["export"]["outputs"]
    assert sorted(export["outputs"]) == ["gguf_q8_0", "merged"]
    for fmt, info in export["outputs"].items():
        assert info["path"].startswith(str(run_dir / "export")) and os.path.exists(info["path"])
        assert re.search(rf"export {fmt} +{re.escape(info['path'])} \(\d+\.\d (KiB|MiB)\)", proc.stdout), fmt
    assert export["outputs"]["gguf_q8_0"]["path"].endswith("-q8_0.gguf")

    # figures rounded; known-harmless library noise silenced at its source
    assert re.search(r"eval loss \d+\.\d{3} -> \d+\.\d{3} in 12 steps", proc.stdout), proc.stdout
    for noise in ("FutureWarning", "Unable to find license information", "Creating initial MLflow database tables"):
        assert noise not in proc.stdout + proc.stderr
    # the run's log holds everything the console showed (progress bars in their last state)
    log = (run_dir / "ftrun.log").read_text(encoding="utf-8").splitlines()
    # (text=True turned the bars' carriage returns into line ends: each redraw is a line here, the last one there)
    shown = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip() and "%|" not in line]
    missing = [line for line in shown if line not in log]
    assert missing == [], missing[:10]
    assert any(line.startswith("fine-tune: 100%|") and "12/12" in line for line in log)


def _check_evaluation(record, run_dir, stdout):
    """The evaluate step's figures in the record, its files in <run dir>/evaluate/, its metrics and rows table on the
    fine-tune's MLflow run, the registered version tagged with the verdict; the test step's endpoint replies on the
    same rows equal the evaluate step's fine-tuned replies, through both routes (train/serve parity)."""
    from mlflow.tracking import MlflowClient

    evaluate = record["steps"]["evaluate"]["outputs"]
    assert evaluate["rows"] == 16 and evaluate["verdicts"]["loss"] == "better"  # 12 steps already lower the loss
    assert set(evaluate["figures"]) == {"loss", "perplexity", "token_accuracy", "rouge_l", "bleu", "chrf",
                                        "exact_match", "reply_length", "stop_rate"}
    assert evaluate["figures"]["loss"]["ft"] < evaluate["figures"]["loss"]["base"]
    for name in ("metrics.json", "rows.jsonl", "report.md", "comparison.png"):
        assert (run_dir / "evaluate" / name).stat().st_size > 0
    assert re.search(r"Loss +\d+\.\d+ -> \d+\.\d+ \(-\d+\.\d+, 95% CI -\d+\.\d+\.\.-\d+\.\d+\) better", stdout)
    tracking_uri = record["steps"]["connect"]["outputs"]["tracking_uri"]
    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(record["steps"]["finetune"]["outputs"]["mlflow_run_id"])
    for prefix in ("eval_base_", "eval_ft_", "eval_delta_"):
        assert run.data.metrics[prefix + "loss"] == pytest.approx(
            evaluate["figures"]["loss"][{"eval_base_": "base", "eval_ft_": "ft", "eval_delta_": "delta"}[prefix]])
    table = json.loads(open(client.download_artifacts(run.info.run_id, "evaluate/rows.json")).read())
    assert len(table["data"]) == 16 and "ft_reply" in table["columns"]
    register = record["steps"]["register"]["outputs"]
    version = client.get_model_version(register["name"], register["version"])
    assert version.tags["eval_verdict"] == "rouge_l: " + evaluate["verdicts"]["rouge_l"]
    assert version.tags["eval_verdict_loss"] == "better"
    test = record["steps"]["test"]["outputs"]
    assert test["rows"] == 4
    for route in ("score", "openai"):
        assert test["evaluate_parity"][route] == {"rows": 4, "equal": 4, "differ": []}, test["evaluate_parity"]
        assert 0 <= test["endpoint_metrics"][route]["rouge_l"] <= 1
    assert 0 <= test["endpoint_metrics"]["openai"]["stop_rate"] <= 1  # the OpenAI route says why a reply ended


def test_an_endpoint_left_running_is_deleted_by_name_from_a_later_run(tmp_path, ftrun_home):
    """`steps=[deploy] from_run=...` serves an earlier run's registered model and leaves it running;
    `steps=[cleanup] endpoint_name=...` deletes it from another process."""
    env = {**os.environ, "FTRUN_HOME": str(ftrun_home)}

    def ftrun(*args):
        return subprocess.run([sys.executable, "-m", "runner.cli", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=600, env=env)

    first = ftrun("steps=[model,data,finetune,register]", "finetune.max_steps=2",
                  "finetune.evaluation_strategy=disable", "finetune.local.eval_before_training=false",
                  f"hydra.run.dir={tmp_path / 'train'}")
    assert first.returncode == 0, first.stderr[-3000:]
    deploy = ftrun("steps=[deploy]", f"from_run={tmp_path / 'train'}", "endpoint_name=left-running",
                   f"hydra.run.dir={tmp_path / 'deploy'}")
    assert deploy.returncode == 0, deploy.stderr[-3000:]
    state = json.loads((tmp_path / "deploy" / "run_record.json").read_text())["steps"]["deploy"]["outputs"]
    assert state["name"] == "left-running"
    try:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", state["port"])) == 0  # still serving after its run ended
    finally:
        cleanup = ftrun("steps=[cleanup]", "endpoint_name=left-running", f"hydra.run.dir={tmp_path / 'cleanup'}")
    assert cleanup.returncode == 0, cleanup.stderr[-3000:]
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", state["port"])) != 0
    assert not os.path.exists(state["key_file"])
    record = json.loads((tmp_path / "cleanup" / "run_record.json").read_text())
    assert record["steps"]["cleanup"]["outputs"]["deleted"] is True
