"""The evaluation's outputs: metrics.json, rows.jsonl, report.md, comparison.png and the console summary."""

import json

import pytest

from runner.evaluation.metrics import RowOutput, resolve_metrics
from runner.evaluation.report import console_summary, summary_line, write_outputs
from runner.evaluation.results import EvalRow, evaluate_outputs
from runner.evaluation.stats import Comparison


def _evaluation(n=12):
    rows = [EvalRow(i, [{"role": "user", "content": f"question {i} | with a pipe\nand a newline"}],
                    f"the answer to question {i} is {i}") for i in range(n)]
    # the fine-tuned model answers rows 0..n-2 right, the base only the first two; row n-1 regresses
    base = [RowOutput(reply=r.reference if i in (0, 1, n - 1) else "no idea", stopped=i % 2 == 0, reply_tokens=5,
                      nll_sum=30.0, target_tokens=6, correct_tokens=1) for i, r in enumerate(rows)]
    ft = [RowOutput(reply=r.reference if i < n - 1 else "wrong", stopped=True, reply_tokens=9,
                    nll_sum=6.0, target_tokens=6, correct_tokens=5) for i, r in enumerate(rows)]
    metrics = resolve_metrics(["loss", "perplexity", "token_accuracy", "rouge_l", "bleu", "chrf", "exact_match",
                               "reply_length", "stop_rate"])
    return evaluate_outputs(rows, base, ft, metrics, seed=7, resamples=200, info={"rows_per_s": 3.5})


def test_summary_line_format():
    c = Comparison("rouge_l", "ROUGE-L", 1, 0.08, 0.61, 0.53, 0.47, 0.58, "better", 10, 100)
    assert summary_line(c, 2) == "ROUGE-L 0.08 -> 0.61 (+0.53, 95% CI +0.47..+0.58) better"
    c = Comparison("loss", "Loss", -1, 2.0, 2.0, 0.0, -0.0, 0.0, "no clear difference", 10, 100)
    assert summary_line(c, 3) == "Loss 2.000 -> 2.000 (+0.000, 95% CI +0.000..+0.000) no clear difference"


def test_evaluation_verdicts_and_row_changes():
    evaluation = _evaluation()
    assert evaluation.primary == "rouge_l"
    assert evaluation.changes[:2] == ["unchanged", "unchanged"] and evaluation.changes[-1] == "regressed"
    assert evaluation.counts() == {"improved": 9, "regressed": 1, "unchanged": 2}
    verdicts = {c.metric: c.verdict for c in evaluation.comparisons}
    assert verdicts["rouge_l"] == verdicts["loss"] == verdicts["token_accuracy"] == "better"
    assert verdicts["reply_length"] == "higher"  # no better direction: described, not judged


def test_outputs_are_written_and_readable(tmp_path):
    evaluation = _evaluation()
    paths = write_outputs(evaluation, tmp_path / "evaluate")
    assert sorted(p.name for p in (tmp_path / "evaluate").iterdir()) == [
        "comparison.png", "metrics.json", "report.md", "rows.jsonl"]  # no temp files left behind

    doc = json.loads(open(paths["metrics_json"]).read())
    assert doc["rows"] == 12 and doc["seed"] == 7 and doc["primary_metric"] == "rouge_l"
    assert doc["metrics"]["rouge_l"]["verdict"] == "better" and doc["verdicts"]["loss"] == "better"
    assert doc["metrics"]["loss"]["base"] == pytest.approx(5.0) and doc["metrics"]["loss"]["ft"] == pytest.approx(1.0)
    assert doc["mlflow"]["eval_base_loss"] == pytest.approx(5.0)
    assert doc["mlflow"]["eval_delta_loss"] == pytest.approx(-4.0)
    assert {"eval_ft_rouge_l", "eval_delta_ci_low_bleu"} <= set(doc["mlflow"])
    assert doc["info"] == {"rows_per_s": 3.5} and len(doc["summary"]) == 9

    rows = [json.loads(line) for line in open(paths["rows_jsonl"])]
    assert len(rows) == 12
    last = rows[-1]
    assert last["ft_reply"] == "wrong" and last["base_reply"] == last["reference"] and last["change"] == "regressed"
    assert last["base_scores"]["rouge_l"] == pytest.approx(1.0) and last["ft_scores"]["rouge_l"] == 0.0
    assert last["prompt"][0]["role"] == "user" and set(last["ft_scores"]) == set(doc["metrics"])

    report = open(paths["report_md"]).read()
    assert "| ROUGE-L |" in report and "**better**" in report
    assert "## Rows that improved most" in report and "## Rows that regressed most" in report
    # a pipe or newline in a prompt does not break the table
    assert "question 11 \\| with a pipe<br>and a newline" in report
    with open(paths["comparison_png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_console_summary_has_one_line_per_metric():
    text = console_summary(_evaluation())
    lines = text.splitlines()
    assert "12 held-out rows" in lines[0] and "9 improved, 1 regressed" in lines[0]
    assert len(lines) == 10
    rouge = next(line for line in lines if line.strip().startswith("ROUGE-L"))
    assert rouge.rstrip().endswith("better") and "95% CI +" in rouge


def test_identical_models_write_no_clear_difference(tmp_path):
    evaluation = _evaluation()
    same = evaluate_outputs(evaluation.rows, evaluation.base, evaluation.base, evaluation.metrics, seed=1,
                            resamples=100)
    assert all(c.verdict == "no clear difference" for c in same.comparisons)
    assert same.counts()["unchanged"] == 12
    write_outputs(same, tmp_path)
    assert "None." in open(tmp_path / "report.md").read()
