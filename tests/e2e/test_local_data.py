"""Your own data, end to end on the local backend: `ftrun dataset=local dataset.train_file=<file>` runs all ten
steps on an OpenAI-format JSONL file, and on a ShareGPT file with dataset.format=auto; the data lands in a folder
named after the file, the model is registered under the file's name, and the fine-tuned model answers a request
drawn from the held-out eval rows."""

import json
import os
import subprocess
import sys

import pytest

from runner.data.sample import generate_rows
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def conversations(n=320):
    """n distinct conversations (the offline sample's, whose tokenizer the tiny model has), deduplicated by content."""
    seen, out = set(), []
    for seed in range(1, 10):
        for row in generate_rows(200, seed, "train_sft"):
            key = json.dumps(row["messages"])
            if key not in seen:
                seen.add(key)
                out.append(row["messages"])
            if len(out) == n:
                return out
    raise AssertionError("not enough distinct sample conversations")


def openai_row(messages):
    return {"messages": messages}


def sharegpt_row(messages):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}


@pytest.fixture(scope="module")
def converter(sdist):
    """export.converter=<the pinned llama-cpp-python sdist, cached by pytest> (ftrun fetches it with pip itself)."""
    return f"export.converter={sdist}"


def run_local(tmp_path, ftrun_home, train_file, *overrides):
    run_dir = tmp_path / "run"
    env = {**os.environ, "FTRUN_HOME": str(ftrun_home)}
    proc = subprocess.run(
        [sys.executable, "-m", "runner.cli", "dataset=local", f"dataset.train_file={train_file}", *overrides,
         "finetune.max_steps=12", "finetune.eval_steps=6", "evaluate.max_rows=8", "evaluate.max_new_tokens=16",
         f"hydra.run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, json.loads((run_dir / "run_record.json").read_text()), run_dir


def check_whole_run(proc, record, run_dir, ftrun_home, folder, model):
    assert record["status"] == "ok" and all(s["status"] == "ok" for s in record["steps"].values())
    assert list(record["steps"]) == ["connect", "model", "compute", "data", "finetune", "metrics", "evaluate",
                                     "register", "export", "deploy", "test", "cleanup"]
    data = record["steps"]["data"]["outputs"]
    assert data["download_dir"] == str((ftrun_home / "data" / folder).resolve())  # named after the data
    assert data["rows"] == {"train_sft": 304, "test_sft": 16, "train_gen": 304, "test_gen": 16}  # 5% held out
    summary = json.loads(open(data["exploration"]["summary_json"]).read())
    assert summary["train_sft"]["tokens"]["max"] > 0 and "truncated_rows" in summary["train_sft"]
    assert open(data["exploration"]["plot"], "rb").read(4) == b"\x89PNG"

    finetune = record["steps"]["finetune"]["outputs"]
    assert finetune["global_step"] == 12 and finetune["eval_loss"] < finetune["eval_loss_before"]
    assert record["steps"]["register"]["outputs"]["model_uri"].startswith(f"models:/{model}/")

    eval_users = {m["content"] for line in open(data["test_file"]) for m in json.loads(line)["messages"]
                  if m["role"] == "user"}
    request = json.loads((run_dir / "sample_score.json").read_text())
    asked = request["input_data"]["input_string"][0]
    assert asked[-1]["role"] == "user" and asked[-1]["content"] in eval_users  # drawn from the eval rows
    reply = record["steps"]["test"]["outputs"]["reply"]
    assert isinstance(reply, str) and reply.strip() and "sample reply" in proc.stdout
    print(f"eval loss {finetune['eval_loss_before']:.3f} -> {finetune['eval_loss']:.3f}; registered "
          f"{record['steps']['register']['outputs']['model_uri']}; reply {reply[:80]!r}")


def test_an_openai_format_jsonl_file_runs_the_whole_local_workflow(tmp_path, ftrun_home, converter):
    train = tmp_path / "support_chats.jsonl"
    train.write_text("".join(json.dumps(openai_row(m), ensure_ascii=False) + "\n" for m in conversations()),
                     encoding="utf-8")
    proc, record, run_dir = run_local(tmp_path, ftrun_home, train, converter)
    check_whole_run(proc, record, run_dir, ftrun_home, "support_chats", "tiny-phi3-support-chats")


def test_a_sharegpt_file_runs_the_whole_local_workflow_with_format_auto(tmp_path, ftrun_home, converter):
    train = tmp_path / "sharegpt.json"  # a JSON array this time
    train.write_text(json.dumps([sharegpt_row(m) for m in conversations()], ensure_ascii=False), encoding="utf-8")
    proc, record, run_dir = run_local(tmp_path, ftrun_home, train, "dataset.format=auto", converter)
    check_whole_run(proc, record, run_dir, ftrun_home, "sharegpt", "tiny-phi3-sharegpt")
    assert record["steps"]["data"]["outputs"]["sources"]["train"]["converted"] is True
