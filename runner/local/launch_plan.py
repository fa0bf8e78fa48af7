"""How many processes a fine-tune needs and which DeepSpeed config it runs with: what the recipe, the in-process
entry (runner/local/train.py) and the torchrun launcher (runner/local/distributed.py) all read, below all three.

The DeepSpeed config leaves batch sizes, accumulation, clipping and precision to the Trainer ("auto"), so the
finetune keys stay the single source of truth. `finetune.deepspeed=<file>` uses that JSON instead.
"""

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

from runner.errors import RunnerError

RESULT_FILE = "result.json"
DEEPSPEED_FILE = "deepspeed_config.json"
# The kinds of metrics.jsonl event that reach log_fn, in-process (trainer.Events) and replayed after a launch alike;
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
