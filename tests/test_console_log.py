"""<run dir>/ftrun.log holds everything the console shows; figures are printed rounded."""

import os
import subprocess
import sys

from runner.figures import figure
from tests.conftest import REPO


SCRIPT = r"""
import os, subprocess, sys
from runner.console_log import ConsoleLog

with ConsoleLog(sys.argv[1]):
    print("==> [1/1] step", flush=True)
    print("a warning line", file=sys.stderr, flush=True)
    os.write(1, b"straight to fd 1\n")
    child = ("import sys, warnings; print('from a child'); print('child err', file=sys.stderr); "
             "warnings.warn('a library warning')")
    subprocess.run([sys.executable, "-c", child], check=True)
    for i in range(1, 4):  # a progress bar redrawn in place
        sys.stderr.write(f"\rfine-tune: {i}/3")
        sys.stderr.flush()
    sys.stderr.write("\n")
    print("caf\u00e9 \u2713", flush=True)
print("after the block", flush=True)
"""


def test_everything_written_to_the_console_reaches_the_log(tmp_path):
    log = tmp_path / "ftrun.log"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], cwd=REPO, capture_output=True, timeout=60,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr
    lines = log.read_text(encoding="utf-8").splitlines()
    for expected in ("==> [1/1] step", "a warning line", "straight to fd 1", "from a child", "child err",
                     "caf\u00e9 \u2713"):
        assert expected in lines
    assert "fine-tune: 3/3" in lines and not any("1/3" in line for line in lines)  # the bar's last state only
    assert any("UserWarning: a library warning" in line for line in lines)
    assert "after the block" not in lines
    # the console still got all of it, the bar's every state included, and what came after
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert "from a child" in out and "straight to fd 1" in out and "after the block" in out
    assert "fine-tune: 1/3" in err and "a warning line" in err


def test_a_refused_config_is_in_the_log_too(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "runner.cli", "+finetune.learnign_rate=1e-5",
                           f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "finetune.learnign_rate is not a config key" in proc.stderr
    log = (run_dir / "ftrun.log").read_text()
    assert "ftrun: invalid config" in log and "finetune.learnign_rate is not a config key" in log


def test_figures_are_rounded_for_people():
    assert figure(7.648067477817449) == "7.648"
    assert figure(0.35412) == "0.354"
    assert figure(2.5e-6) == "2.5e-06"
    assert figure(1234567.0) == "1.23e+06"
    assert figure(3401) == "3,401"
    assert figure(None) == "n/a" and figure(True) == "True"
