"""bench/gpu_train.py on a machine without CUDA: it refuses without --smoke (exit non-zero, saying why), and
--smoke runs the same harness (model build, synthetic data, a worker process per contender, the table) on the CPU
with the tiny Phi-3 shape. No GPU figure is checked here: the smoke run's numbers are only printed."""

import subprocess
import sys

import pytest

from tests.conftest import REPO

BENCH = REPO / "bench" / "gpu_train.py"
COLUMNS = ("contender", "tok/s", "padding", "peak GB", "est GB", "peak/est", "MFU", "ckpt", "steps", "loss")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_cuda(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_says_so_and_exits_nonzero():
    proc = subprocess.run([sys.executable, str(BENCH)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "no CUDA device is visible" in proc.stderr and "--smoke" in proc.stderr


@pytest.mark.slow
def test_smoke_runs_the_harness_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--contenders", "runner", "--work",
                           str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    lines = proc.stdout.splitlines()
    header = next(line for line in lines if line.startswith("contender"))
    for column in COLUMNS:
        assert column in header, column
    row = next(line for line in lines if line.startswith("runner "))
    fields = row.split()
    assert fields[0] == "runner" and float(fields[1]) > 0  # tok/s measured
    assert fields[2].endswith("%")  # padding
    assert fields[3:7] == ["n/a"] * 4  # peak, estimate, ratio, MFU: GPU-only figures, never invented on the CPU
    assert int(fields[8]) == 4  # the smoke run's steps
    assert "templated tokens mean" in proc.stdout and "device: CPU (smoke" in proc.stdout
