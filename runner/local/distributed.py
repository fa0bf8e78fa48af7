"""Several GPUs and DeepSpeed: the generated DeepSpeed config and the torchrun launch of the trainer.

`train()` runs in-process on one device and never launches. With several GPUs (or DeepSpeed, whose engine expects
a launcher even on one GPU) its caller (the local backend's finetune step) sees `processes_needed() > 0` and calls
`launch()`, which writes a launch spec (train()'s keyword arguments) and starts
torchrun (`python -m runner.local.distributed --torchrun --standalone --nproc_per_node=N -m runner.local.distributed
<spec>`: torch.distributed.run, minus its traceback for a worker that already said why it failed); every worker
calls `train()` with those arguments (inside the launch `processes_needed()` is 0), the Trainer picks up the
process group from the torchrun environment, and rank 0 writes the result JSON that `launch()` returns.

The DeepSpeed config leaves batch sizes, accumulation, clipping and precision to the Trainer ("auto"), so the
finetune keys stay the single source of truth. `finetune.deepspeed=<file>` uses that JSON instead.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from runner.errors import RunnerError

RESULT_FILE = "result.json"
SPEC_FILE = "launch_spec.json"
# a worker that ends with a RunnerError (an OOM's advice, bad data) writes its message here, so the launcher can
# raise the same clear error instead of "exit 1" and the workers' tracebacks
ERROR_FILE = "worker_error-{rank}.json"
DEEPSPEED_FILE = "deepspeed_config.json"
# The kinds of metrics.jsonl event that reach log_fn, in-process (train._Events) and replayed after a launch alike;
# the "summary" event stays in the file.
LOGGED_KINDS = ("train", "eval")


def deepspeed_config(stage: int) -> Dict[str, Any]:
    """A ZeRO stage 2 or 3 config for transformers' Trainer integration."""
    if stage not in (2, 3):
        raise RunnerError(f"finetune.deepspeed_stage={stage!r} is not supported; use 2 or 3")
    zero: Dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if stage == 2:
        zero.update(allgather_partitions=True, allgather_bucket_size=2e8, reduce_scatter=True)
    else:
        zero.update(
            sub_group_size=1e9,
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            stage3_max_live_parameters=1e9,
            stage3_max_reuse_distance=1e9,
            # the final save must hold whole weights, not ZeRO shards, so the model reloads with transformers
            stage3_gather_16bit_weights_on_model_save=True,
        )
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def write_deepspeed_config(out_dir, params: Dict[str, Any]) -> Optional[str]:
    """The DeepSpeed JSON for this run (None without apply_deepspeed): the user's file when `deepspeed` names one,
    else one generated for `deepspeed_stage`. Written atomically into out_dir."""
    if not params["apply_deepspeed"]:
        return None
    user_file = params["deepspeed"]
    if user_file:
        path = Path(user_file)
        if not path.is_file():
            raise RunnerError(f"finetune.deepspeed={user_file!r}: no such file (give a DeepSpeed JSON config, or "
                              f"leave it empty to generate one for finetune.deepspeed_stage)")
        try:
            config = json.loads(path.read_text())
        except ValueError as exc:
            raise RunnerError(f"finetune.deepspeed={user_file!r} is not valid JSON: {exc}") from None
    else:
        config = deepspeed_config(int(params["deepspeed_stage"]))
    from runner.local.checkpoints import write_atomic

    out = Path(out_dir) / DEEPSPEED_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(config, indent=1))
    return str(out)


def inside_launch() -> bool:
    """True in a torchrun worker (the launcher sets these)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def processes_needed(params: Dict[str, Any], local: Dict[str, Any], device: str, cuda_count: int) -> int:
    """How many worker processes to launch; 0 = train in this process."""
    if device != "cuda" or inside_launch():
        return 0
    n = int(local["num_gpus"] or 0) or cuda_count
    if n > cuda_count:
        raise RunnerError(f"finetune.local.num_gpus={n} but only {cuda_count} CUDA device(s) are visible")
    if n > 1 or params["apply_deepspeed"]:
        return max(n, 1)
    return 0


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
