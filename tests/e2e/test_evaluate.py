"""The evaluate step end to end on the tiny model, from one trained and registered run (built once for the module):
`steps=[evaluate] from_run=` on the registered model (checked against the record first) with a golden file in
another format, a record whose model changed since it was registered refused, and a damaged model judged `worse`
and refused by `register.require_improvement=rouge_l`."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

# enough training for the tiny model to answer the sample chats (ROUGE-L ~0.2 on held-out rows), cheaply
TRAIN = ["finetune.max_steps=150", "finetune.learning_rate=4e-3", "finetune.evaluation_strategy=disable",
         "finetune.local.eval_before_training=false"]
QUICK_EVAL = ["evaluate.max_rows=32", "evaluate.max_new_tokens=24", "evaluate.resamples=500"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("evaluate_home")


def ftrun(home, run_dir, *args):
    env = {**os.environ, "FTRUN_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "runner.cli", *args, f"hydra.run.dir={run_dir}"], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env=env)
    record_file = run_dir / "run_record.json"
    return proc, (json.loads(record_file.read_text()) if record_file.exists() else None)


@pytest.fixture(scope="module")
def trained(home):
    run_dir = home / "trained"
    proc, record = ftrun(home, run_dir, "steps=[connect,model,compute,data,finetune,register]", *TRAIN)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, record


def _golden_sharegpt(record, path, rows=12):
    """A golden set in ShareGPT form (any format dataset=local reads), from the held-out split."""
    lines = open(record["steps"]["data"]["outputs"]["test_file"], encoding="utf-8").read().splitlines()[:rows]
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            chat = [{"from": names[m["role"]], "value": m["content"]} for m in json.loads(line)["messages"]]
            f.write(json.dumps({"conversations": chat}) + "\n")
    return path


def test_an_earlier_runs_registered_model_on_a_golden_file(home, trained, tmp_path):
    run_dir, record = trained
    golden = _golden_sharegpt(record, tmp_path / "golden.jsonl")
    proc, later = ftrun(home, tmp_path / "later", "steps=[evaluate]", f"from_run={run_dir}",
                        f"evaluate.file={golden}", "evaluate.max_new_tokens=16")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    evaluate = later["steps"]["evaluate"]["outputs"]
    assert evaluate["fine_tuned"] == record["steps"]["register"]["outputs"]["model_uri"]  # the registered version
    assert evaluate["rows_file"] == str(golden) and evaluate["rows"] == 12
    assert evaluate["verdicts"]["loss"] == "better" and evaluate["verdicts"]["token_accuracy"] == "better"
    assert (tmp_path / "later" / "evaluate" / "rows.jsonl").read_text().count("\n") == 12
    assert "fine-tuned vs base on 12 held-out rows" in proc.stdout


def test_a_registered_model_that_changed_since_its_record_is_refused(home, trained, tmp_path):
    """The identity check of issue 29: a version whose files no longer match the record is not evaluated."""
    run_dir, record = trained
    copy = tmp_path / "copied_run"
    shutil.copytree(run_dir, copy)
    record["steps"]["register"]["outputs"]["model_sha256"] = "0" * 64
    (copy / "run_record.json").write_text(json.dumps(record))
    proc, later = ftrun(home, tmp_path / "later", "steps=[evaluate]", f"from_run={copy}")
    assert proc.returncode != 0
    assert later["steps"]["evaluate"]["status"] == "failed"
    assert "changed since run" in later["steps"]["evaluate"]["error"]


def _damaged_copy(model_dir, out):
    """The trained model with every weight scaled by 4 and its output rows shuffled (seeded): fluent in nothing.
    Scaling alone left a short-trained model's replies close enough to its own on ROUGE-L for the interval to
    cross 0; shuffling which token each output row names makes every reply another model's words."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
        head = model.get_output_embeddings().weight
        head.copy_(head[torch.randperm(head.shape[0], generator=torch.Generator().manual_seed(0))])
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def test_a_damaged_model_is_worse_and_refused_by_require_improvement(home, trained, tmp_path):
    """The trained model as the base, a damaged copy as the fine-tuned one (a record saying so, as a fine-tune
    gone wrong would leave it): ROUGE-L is genuinely worse, and register.require_improvement=rouge_l refuses it."""
    run_dir, record = trained
    final_model = record["steps"]["finetune"]["outputs"]["final_model_dir"]
    damaged = _damaged_copy(final_model, tmp_path / "damaged")
    crafted = tmp_path / "damaged_run"
    crafted.mkdir()
    steps = {k: v for k, v in record["steps"].items() if k in ("connect", "model", "data", "finetune")}
    steps["model"]["outputs"]["model_dir"] = final_model
    steps["finetune"]["outputs"]["final_model_dir"] = str(damaged)
    (crafted / "run_record.json").write_text(json.dumps({**record, "run_dir": str(crafted), "steps": steps}))
    proc, later = ftrun(home, tmp_path / "gate", "steps=[evaluate,register]", f"from_run={crafted}",
                        "register.require_improvement=rouge_l", *QUICK_EVAL)
    assert proc.returncode != 0
    rouge = later["steps"]["evaluate"]["outputs"]["figures"]["rouge_l"]
    assert rouge["verdict"] == "worse" and rouge["ci_high"] < 0 and rouge["base"] > 0.1, rouge
    register = later["steps"]["register"]
    assert register["status"] == "refused" and "ROUGE-L is worse than the base model" in register["reason"]
    assert "register.require_improvement=rouge_l" in register["reason"]
