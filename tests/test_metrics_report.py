"""The backend-neutral report: final figures, the markdown table and the loss-curve PNG."""

import json
import math
import struct
import subprocess
import sys

from runner.metrics_report import final_figures, format_table, report

HISTORY = {
    "train_loss": [[10, 7.2], [20, 5.1], [30, 3.9]],
    "learning_rate": [[10, 2e-4], [20, 1e-4], [30, 0.0]],
    "tokens_per_s": [[10, 9000.0], [20, 11000.0], [30, 10500.0]],
    "eval_loss": [[0, 7.6], [30, 4.2]],
    "perplexity": [[0, 2000.0], [30, 66.7]],
    "unrelated": [[1, 1.0]],
}


def png_size(path):
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    data = open(path, "rb").read(32)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_report_final_table_and_plot(tmp_path):
    out = report(HISTORY, tmp_path / "metrics", title="tiny_phi3 lora r8")
    assert out["final"] == {"train_loss": 3.9, "eval_loss": 4.2, "perplexity": 66.7, "tokens_per_s": 10500.0,
                            "learning_rate": 0.0}
    table = out["table"]
    assert table.splitlines()[0] == "| metric | final | at step | first | best |"
    assert "| eval_loss | 4.2000 | 30 | 7.6000 | 4.2000 |" in table  # before (step 0) and after training
    assert "| tokens_per_s | 10,500 | 30 | 9,000 | 11,000 |" in table
    assert "unrelated" not in table
    width, height = png_size(out["plot"])
    assert out["plot"].endswith("loss_curve.png") and width > 300 and height > 200
    saved = json.loads(open(out["json"]).read())
    assert saved["final"] == out["final"] and saved["history"]["eval_loss"] == [[0, 7.6], [30, 4.2]]
    json.dumps(out)  # the run record stores it
    assert not list((tmp_path / "metrics").glob(".*tmp"))  # no temp files left behind


def test_only_train_or_only_eval_or_nothing(tmp_path):
    only_train = report({"loss": [[1, 2.0], [2, 1.5]]}, tmp_path / "a", title="t")
    assert only_train["final"] == {"train_loss": 1.5}
    only_eval = report({"eval_loss": [[5, 2.0]]}, tmp_path / "b", title="e")
    assert only_eval["final"]["perplexity"] == math.exp(2.0)  # derived when the trainer logs none
    nothing = report({}, tmp_path / "c", title="n")
    assert nothing["final"] == {} and "no metrics logged" in nothing["table"]
    for out in (only_train, only_eval, nothing):
        assert png_size(out["plot"])[0] > 0


def test_format_table_of_final_figures_only():
    table = format_table(final_figures(HISTORY))
    assert table.splitlines()[:2] == ["| metric | final |", "|---|---:|"]
    assert "| learning_rate | 0 |" in table and "| perplexity | 66.7000 |" in table


def test_module_imports_no_heavy_library():
    code = ("import sys, runner.metrics_report; "
            "print([m for m in ('mlflow', 'torch', 'matplotlib', 'azure') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
