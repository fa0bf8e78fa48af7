"""What the Azure pipeline job uploads: messages rows, as the chat_completion components document them. A split
with other keys goes up as a messages-only copy; ultrachat rows (messages + prompt/prompt_id) go up as they are."""

import json

from runner.azureml.backend import AzureMLBackend
from runner.data.upload import messages_only
from tests.azureml.double import AzureWorld
from tests.azureml.test_backend import make_ctx, node_inputs, notebook_cfg, run_steps, write_data

MESSAGES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def test_rows_with_extra_keys_are_uploaded_from_a_messages_only_copy(tmp_path):
    files = {}
    for split in ("train_sft", "test_sft", "test_gen"):
        path = tmp_path / "data" / f"{split}.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"id": 7, "source": "crm", "messages": MESSAGES}) + "\n")
        files[split] = str(path)
    data = {"train_file": files["train_sft"], "test_file": files["test_sft"], "sample_file": files["test_gen"]}
    world = AzureWorld()
    cfg = notebook_cfg(tmp_path, "backend.wait=false")
    ctx = make_ctx(cfg, tmp_path)
    record = run_steps(AzureMLBackend(cfg, clients=world.clients()), ctx, data,
                       steps=("connect", "model", "compute", "data", "finetune"))
    uploaded = record.output("data", "train_file")
    assert uploaded != data["train_file"] and record.output("data", "data_train_file") == data["train_file"]
    assert [json.loads(x) for x in open(uploaded)] == [{"messages": MESSAGES}]
    assert [json.loads(x) for x in open(record.output("data", "test_file"))] == [{"messages": MESSAGES}]
    job = world.find("workspace.jobs.create_or_update")[0].args[0]
    assert node_inputs(job)["train_file_path"] == uploaded  # the copy is what the job uploads
    assert json.loads(open(data["train_file"]).read())["source"] == "crm"  # the data step's file is untouched


def test_ultrachat_rows_are_uploaded_as_they_are(tmp_path):
    data = write_data(tmp_path)  # prompt, prompt_id and messages, as the notebook uploaded them
    assert messages_only(data["train_file"], tmp_path / "copy.jsonl") == tmp_path / "data" / "train_sft.jsonl"
    assert not (tmp_path / "copy.jsonl").exists()
    cfg = notebook_cfg(tmp_path)
    out = AzureMLBackend(cfg, clients=AzureWorld().clients()).data(make_ctx(cfg, tmp_path), data)
    assert "train_file" not in out and out["azure_inputs"]["train_file_path"]["path"] == data["train_file"]
