"""The local fine-tune's entry point: `train()` translates the settings (runner/local/translate.py), checks them and
runs the recipe (runner/local/recipe.py) in this process. The local backend calls it, and so does every torchrun
worker (runner/local/distributed.py) of a multi-GPU or DeepSpeed run; it never launches."""

from typing import Optional

from runner.errors import RunnerError
from runner.local.launch_plan import processes_needed
from runner.local.trainer import LogFn, TrainingInterrupted  # noqa: F401  (what a caller catches: raised from here)


def resolve_device(device: str) -> str:
    """"auto" → cuda when a CUDA device is visible, else cpu; "cpu"/"cuda" as given."""
    if device == "auto":
        return "cuda" if _cuda_count() else "cpu"
    return device


def train(*, model_dir, train_file, eval_file, params: dict, local: dict, out_dir, device="cpu",
          trust_remote_code=False, log_fn: Optional[LogFn] = None, cache_dir=None, progress=True,
          plan=None) -> dict:
    """Fine-tune the model in model_dir on train_file in this process; see the module docstring. Returns
    JSON-serialisable figures and paths (final_model_dir, checkpoints_dir, global_step, train_loss,
    eval_loss_before, eval_loss, perplexity, tokens_per_s, train_runtime_s, trainable_params, total_params,
    resumed_from, metrics_file, padding_fraction, ...).

    params are the effective component keys, local is finetune.local (both whole: runner/local/translate.py
    refuses a missing key). Runs the recipe (runner/local/recipe.py) on one device; several GPUs or DeepSpeed need
    the torchrun launch, which its caller performs (runner/local/distributed.launch; every worker then calls this
    with the same arguments) — train() never launches, and refuses to run such settings outside a launch.
    `plan`: translate(params, local), where the caller has made it already (the local backend's finetune step), so
    the settings are translated once per process."""
    from runner.local.recipe import LocalRecipe, run_recipe
    from runner.local.translate import translate

    device = resolve_device(device)
    plan = plan if plan is not None else translate(params, local)
    plan.check(device)  # before anything is loaded
    nproc = processes_needed(plan.params, plan.local, device, _cuda_count() if device == "cuda" else 0)
    if nproc:
        raise RunnerError(f"these settings train in {nproc} torchrun worker(s) (several GPUs or DeepSpeed): start "
                          f"them with runner.local.distributed.launch(), as the local backend's finetune step does; "
                          f"train() runs in one process and does not launch")
    recipe = LocalRecipe(plan, model_dir=model_dir, train_file=train_file, eval_file=eval_file, out_dir=out_dir,
                         device=device, trust_remote_code=trust_remote_code, log_fn=log_fn, cache_dir=cache_dir,
                         progress=progress)
    return run_recipe(recipe)


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install reads as no GPU
        return 0
