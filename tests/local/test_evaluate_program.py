"""`python -m runner.local.evaluate_program`: the evaluator as a program (what the Azure evaluate job runs)."""

import json
import shutil

import pytest

from runner.errors import RunnerError
from runner.local.evaluate_program import main, model_folder


def _mlflow_layout(tiny_model_dir, dest):
    """The Azure registry's hftransformersv2 MLflow folder: weights in data/model, tokenizer in data/tokenizer."""
    (dest / "data" / "model").mkdir(parents=True)
    (dest / "data" / "tokenizer").mkdir(parents=True)
    (dest / "MLmodel").write_text("flavors: {hftransformersv2: {}}\n")
    for item in tiny_model_dir.iterdir():
        is_tokenizer = item.name.startswith(("tokenizer", "special_tokens", "chat_template"))
        shutil.copy(item, dest / "data" / ("tokenizer" if is_tokenizer else "model") / item.name)
    return dest


def test_model_folders_of_every_layout_are_found(tiny_model_dir, tmp_path):
    assert model_folder(tiny_model_dir, tmp_path) == tiny_model_dir
    joined = model_folder(_mlflow_layout(tiny_model_dir, tmp_path / "mlflow"), tmp_path)
    assert (joined / "config.json").exists() and (joined / "tokenizer_config.json").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunnerError, match="no model found"):
        model_folder(tmp_path / "empty", tmp_path)


@pytest.mark.slow
def test_the_program_scores_writes_and_logs_to_mlflow(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from runner.data.sample import generate_rows

    rows = tmp_path / "test_sft.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in generate_rows(8, 42, "test_sft")))
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts land under the working folder
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ft = _mlflow_layout(tiny_model_dir, tmp_path / "ft_mlflow")
    code = main(["--base", str(tiny_model_dir), "--ft", str(ft), "--rows", str(rows), "--out", str(tmp_path / "out"),
                 "--max-rows", "6", "--max-new-tokens", "8", "--batch-size", "3", "--resamples", "200",
                 "--metrics", "loss,rouge_l,stop_rate"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "6/6 rows" in printed and "ROUGE-L" in printed and "no clear difference" in printed
    doc = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(doc["verdicts"]) == {"loss", "rouge_l", "stop_rate"} and doc["rows"] == 6

    import mlflow

    run = mlflow.search_runs(search_all_experiments=True, output_format="list")[0]
    assert run.data.metrics["eval_delta_loss"] == 0.0 and "eval_base_rouge_l" in run.data.metrics
    assert run.data.tags["eval_verdict_loss"] == "no clear difference"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "evaluate")}
    assert {"evaluate/rows.json", "evaluate/metrics.json", "evaluate/report.md"} <= artifacts


def test_bad_input_exits_2_with_a_message(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # never loaded: the metric name is refused first
    code = main(["--base", str(model), "--ft", str(model), "--rows", str(rows),
                 "--out", str(tmp_path / "out"), "--metrics", "loss,nope"])
    assert code == 2 and "unknown metric(s) 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
