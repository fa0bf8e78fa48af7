"""Several GPUs and DeepSpeed: the generated DeepSpeed config and the torchrun launch of the trainer.

`train()` runs in-process on one device and never launches. With several GPUs (or DeepSpeed, whose engine expects
a launcher even on one GPU) its caller (the local backend's finetune step) sees `processes_needed() > 0` and calls
`launch()`, which writes a launch spec (train()'s keyword arguments) and starts
torchrun (`python -m runner.local.distributed --torchrun --standalone --nproc_per_node=N -m runner.local.distributed
<spec>`: torch.distributed.run, minus its traceback for a worker that already said why it failed); every worker
calls `train()` with those arguments (inside the launch `processes_needed()` is 0), the Trainer picks up the
process group from the torchrun environment, and rank 0 writes the result JSON that `launch()` returns.

The DeepSpeed config and the number of processes: runner/local/launch_plan.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from runner.errors import RunnerError

SPEC_FILE = "launch_spec.json"
# a worker that ends with a RunnerError (an OOM's advice, bad data) writes its message here, so the launcher can
# raise the same clear error instead of "exit 1" and the workers' tracebacks
ERROR_FILE = "worker_error-{rank}.json"

# what the launcher shares with the recipe (kept importable from here, the launcher's module)
from runner.local.launch_plan import (  # noqa: E402,F401
    DEEPSPEED_FILE, LOGGED_KINDS, RESULT_FILE, deepspeed_config, inside_launch, processes_needed, write_deepspeed_config)

LAUNCHER_FLAG = "--torchrun"


def launch_command(nproc: int, spec_path, *, python: str = sys.executable) -> List[str]:
    """torchrun (torch.distributed.run's own arguments after LAUNCHER_FLAG), started through this module so that a
    failed worker does not add torchrun's ChildFailedError traceback to the worker's own message."""
    return [python, "-m", "runner.local.distributed", LAUNCHER_FLAG, "--standalone", f"--nproc_per_node={nproc}",
            "-m", "runner.local.distributed", str(spec_path)]


def _torchrun(args: List[str]) -> None:
    """torch.distributed.run's main without its @record wrapper: a worker that failed has already printed why
    (its RunnerError message, or the traceback of a bug), so a ChildFailedError becomes exit status 1."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(args))
    except ChildFailedError as exc:
        failures = ", ".join(f"rank {rank} exit {f.exitcode}" for rank, f in sorted(exc.failures.items()))
        print(f"torchrun: worker(s) failed: {failures}", file=sys.stderr, flush=True)
        sys.exit(1)


def write_launch_spec(out_dir, train_kwargs: Dict[str, Any]) -> Path:
    from runner.local.checkpoints import write_atomic

    path = Path(out_dir) / SPEC_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(train_kwargs, indent=1, default=str))
    return path


def launch(nproc: int, out_dir, train_kwargs: Dict[str, Any], log_fn=None) -> Dict[str, Any]:
    """Run train(**train_kwargs) in nproc torchrun workers; returns rank 0's result. Metrics reach log_fn
    afterwards from metrics.jsonl (a callback cannot cross process boundaries)."""
    spec = write_launch_spec(out_dir, train_kwargs)
    result_path = Path(out_dir) / RESULT_FILE
    for stale in [result_path, *Path(out_dir).glob(ERROR_FILE.format(rank="*"))]:
        stale.unlink(missing_ok=True)
    cmd = launch_command(nproc, spec)
    print("launching: " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        worker_error = read_worker_errors(out_dir)
        if worker_error:
            raise RunnerError(worker_error)
        raise RuntimeError(f"distributed training failed (exit {proc.returncode}): {' '.join(cmd)}")
    result = json.loads(result_path.read_text())
    if log_fn is not None and result.get("metrics_file"):
        for line in Path(result["metrics_file"]).read_text().splitlines():
            event = json.loads(line)
            step = event.pop("step", 0)
            kind = event.pop("kind", None)
            event.pop("time", None)
            if event and kind in LOGGED_KINDS:
                log_fn(event, step)
    return result


def write_worker_error(out_dir, rank: int, exc: RunnerError) -> Path:
    from runner.local.checkpoints import write_atomic

    path = Path(out_dir) / ERROR_FILE.format(rank=rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"rank": rank, "type": type(exc).__name__, "message": str(exc)}))
    return path


def read_worker_errors(out_dir) -> Optional[str]:
    """The workers' RunnerError messages as one message (None when no worker wrote one): one line when every
    failing rank says the same, else a line per rank."""
    by_message: Dict[str, List[int]] = {}
    for path in sorted(Path(out_dir).glob(ERROR_FILE.format(rank="*"))):
        try:
            error = json.loads(path.read_text())
        except ValueError:
            continue  # written atomically, so only a foreign file could be unreadable
        by_message.setdefault(error["message"], []).append(int(error["rank"]))
    if not by_message:
        return None
    if len(by_message) == 1:
        (message, ranks), = by_message.items()
        return f"{message} (rank {', '.join(map(str, sorted(ranks)))} of the torchrun launch)"
    return "the torchrun workers failed:\n" + "\n".join(
        f"  rank {', '.join(map(str, sorted(ranks)))}: {message}" for message, ranks in by_message.items())


def main(argv: Optional[List[str]] = None) -> None:
    """torchrun's entry (LAUNCHER_FLAG first) and the worker's: train with the spec's arguments (rank 0 writes the
    result). A RunnerError is the runner's own clear message: it goes to the launcher through a file and is printed
    here without a traceback; any other exception is a bug and keeps its traceback."""
    from runner.local.train import train

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == LAUNCHER_FLAG:
        return _torchrun(argv[1:])
    kwargs = json.loads(Path(argv[0]).read_text())
    try:
        train(**kwargs)
    except RunnerError as exc:
        rank = int(os.environ.get("RANK", "0"))
        write_worker_error(kwargs["out_dir"], rank, exc)
        print(f"rank {rank}: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
