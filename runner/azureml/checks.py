"""Checks the notebook makes (and a few it should), each before the call that would spend money.

Every failure is a ConfigError that says what was wrong, which key sets it and what would be right.
"""

import re
from typing import Any, Dict, Iterable, List, Optional

from runner.errors import RunnerError
from runner.schema import ConfigError


class AzureStepError(RunnerError):
    """A step that cannot go on for a reason the user can act on (an earlier step missing, a job not completed,
    no capacity for the cluster): printed by ftrun as a message, without a traceback."""


# The notebook's list of GPU sizes the fine-tune components cannot use (K80), checked when a model has no allow list.
UNSUPPORTED_GPU_SIZES = ["standard_nc6", "standard_nc12", "standard_nc24", "standard_nc24r"]

# Endpoint and deployment names as the service checks them: 3-32 characters, a letter first, then letters, digits and
# '-', and not ending in '-'.
_SERVICE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9-]{1,30}[A-Za-z0-9]$")


def name_problem(name: str) -> str:
    """What is wrong with an endpoint or deployment name, '' if nothing."""
    if not 3 <= len(name) <= 32:
        return f"is {len(name)} characters (3-32 allowed)"
    if not name[0].isalpha() or not name.isascii():
        return "must start with a letter"
    if name.endswith("-"):
        return "must not end with '-'"
    if not _SERVICE_NAME.match(name):
        return "may hold only letters, digits and '-'"
    return ""


def allowed_compute_hint(allow_list: List[str]) -> str:
    """Only presets whose size is in the list (a fixed example such as compute=nd96asr_v4 is wrong for models that
    do not list it, e.g. Phi-3.5-mini-instruct)."""
    from runner.presets import compute_presets_for

    presets = compute_presets_for(allow_list)
    if presets:
        return "Pick an allowed size: compute=" + " | ".join(presets)
    return f"Pick an allowed size: compute.size={allow_list[0]} (no compute preset in conf/compute/ has one)"


class AllowListRefusal(ConfigError):
    """A size outside a model's allow list; carries where the list came from, for the run record (the message stays
    the same whichever source, so that a plan and a run refuse alike)."""

    def __init__(self, message: str, *, kind: str, size: str, allow_list: List[str], source: Optional[str]):
        super().__init__(message)
        self.details = {"check": f"{kind} compute allow list", "size": size, "allow_list": list(allow_list),
                        "allow_list_source": source or "unknown"}


def check_finetune_size(size: str, allow_list: List[str], *, model_name: str, where: str = "compute.size",
                        source: Optional[str] = None) -> None:
    """Case-insensitive, as the notebook compares sizes."""
    allowed = [s.lower() for s in allow_list]
    if allow_list:
        if size.lower() not in allowed:
            raise AllowListRefusal(
                f"{where}={size} is not in {model_name}'s fine-tune compute allow list: "
                f"{', '.join(allow_list)}. {allowed_compute_hint(allow_list)}",
                kind="fine-tune", size=size, allow_list=allow_list, source=source)
    elif size.lower() in UNSUPPORTED_GPU_SIZES:
        raise ConfigError(
            f"{where}={size} is a K80 size the fine-tune components do not support "
            f"({', '.join(UNSUPPORTED_GPU_SIZES)}); pick a newer GPU size"
        )


def check_inference_size(instance_type: str, allow_list: List[str], *, model_name: str,
                         source: Optional[str] = None) -> None:
    if allow_list and instance_type.lower() not in [s.lower() for s in allow_list]:
        raise AllowListRefusal(
            f"deployment.instance_type={instance_type} is not in {model_name}'s inference compute allow list: "
            f"{', '.join(allow_list)}",
            kind="inference", size=instance_type, allow_list=allow_list, source=source)


def check_provisioning(compute: Any, name: str) -> None:
    state = str(getattr(compute, "provisioning_state", "") or "")
    if state.lower() == "failed":
        raise ConfigError(
            f"compute cluster {name!r} is in provisioning state 'failed': delete it in the studio (or "
            f"`az ml compute delete -n {name}`) and rerun, or use another cluster name (compute.name=...)"
        )


def gpus_for_size(sizes: Iterable[Any], size: str) -> Optional[int]:
    """GPUs per node of `size` from compute.list_sizes() (matched case-insensitively), None if not listed."""
    for sku in sizes:
        if str(getattr(sku, "name", "")).lower() == size.lower():
            gpus = getattr(sku, "gpus", None)
            return int(gpus) if gpus is not None else None
    return None


def reconcile_gpus(listed: Optional[int], configured: int, size: str) -> int:
    """The workspace's figure wins when the config leaves it at 0; a different configured figure is an error."""
    if listed is None:
        raise ConfigError(
            f"compute.size={size} is not among the workspace's VM sizes (compute.list_sizes()): check the size "
            f"name and that the workspace's region offers it"
        )
    if listed < 1:
        raise ConfigError(f"compute.size={size} has no GPUs; fine-tuning needs a GPU size")
    if configured and configured != listed:
        raise ConfigError(
            f"compute.gpus_per_node={configured} but {size} has {listed} GPU(s) per node: set "
            f"compute.gpus_per_node={listed} (or 0 to take it from the workspace)"
        )
    return listed


NAME_RULE = "3-32 characters, starts with a letter, holds only letters, digits and '-' and does not end with '-'"


def _check_name(name: str, what: str, kind: str) -> None:
    problem = name_problem(name)
    if problem:
        raise ConfigError(f"{what} {problem}: {kind} is {NAME_RULE}")


def check_endpoint_name(name: str) -> None:
    _check_name(name, f"endpoint name {name!r} (endpoint_name, or deployment.endpoint_name_prefix + timestamp)",
                "an endpoint name")


def check_deployment_name(name: str) -> None:
    _check_name(name, f"deployment.deployment_name={name!r}", "a deployment name")


def check_memory_fit(
    *, model_name: str, params: Dict[str, Any], gpu_memory_gb: float, gpus_per_node: int, size: str = "",
    model_config: Optional[Dict[str, Any]] = None, lora_target_modules: Optional[List[str]] = None,
    memory_headroom: float = 0.9, refuse_activations: bool = False,
) -> Dict[str, Any]:
    """Before a cluster is created or a job submitted: does the fine-tune fit one GPU of the SKU?

    The estimate is the local trainer's (runner.memory.estimate.estimate_memory; terms in runner/memory/terms.py),
    per GPU, with these assumptions about the Azure component's training, which the runner cannot see:
    - GPU memory: compute.gpu_memory_gb (the preset's per-GPU size, nominal GiB) x memory_headroom; 0 = unknown,
      nothing checked.
    - Shapes: `model_config` (a config.json) or the published config of a preset model (KNOWN_CONFIGS); another
      model is not checked.
    - World size = gpus_per_node x finetune.num_nodes_finetune (gpus_per_node 0, unknown before the workspace
      answers, counts as 1: the least sharding). DeepSpeed ZeRO stage 2 shards gradients and optimizer state over
      it, stage 3 the 16-bit weights too; without DeepSpeed every GPU holds everything (DDP).
    - precision=16: 16-bit weights under DeepSpeed or LoRA, activations in 16-bit; LoRA on the local default
      targets where the model has them (qkv/o/gate_up/down), else every linear layer.
    - Activations: the worst-case micro-batch, per_device_train_batch_size x max_seq_length (-1: the model's
      max_position_embeddings), SDPA attention, no gradient checkpointing (the component takes no such input; if it
      checkpoints, this is an upper bound).
    Weights + gradients + optimizer state over the budget: ConfigError (that cannot train). The micro-batch's peak
    over it: a warning naming the largest micro-batch that fits with the gradient accumulation that keeps the
    effective batch (ConfigError with refuse_activations=True). Returns the estimate and verdict."""
    from runner.memory.estimate import config_shapes, estimate_memory, memory_verdict
    from runner.memory.terms import GB, gpu_memory_bytes, known_model_config

    config = dict(model_config) if model_config else known_model_config(model_name)
    if not gpu_memory_gb or gpu_memory_gb <= 0:
        return {"checked": False, "reason": "compute.gpu_memory_gb is 0 (unknown): memory not checked", "warnings": []}
    if not config:
        return {"checked": False, "warnings": [],
                "reason": f"no config.json numbers for {model_name} (runner.memory.terms.KNOWN_CONFIGS): memory not "
                          "checked"}
    shapes = config_shapes(config)
    world = max(int(gpus_per_node or 0), 1) * max(int(params.get("num_nodes_finetune", 1) or 1), 1)
    apply_lora = bool(params.get("apply_lora"))
    targets = list(lora_target_modules or ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    if apply_lora and not any(n.rsplit(".", 2)[-2] in targets for n in shapes if n.endswith(".weight")):
        targets = []  # every linear layer
    est = estimate_memory(shapes, config, params, apply_lora=apply_lora, lora_target_modules=targets, shards=world)
    b = est["bytes"]
    budget = gpu_memory_bytes(gpu_memory_gb) * memory_headroom
    where = (f"{size or 'compute.size'}: {gpu_memory_gb} GiB per GPU x compute.memory_headroom={memory_headroom}, "
             f"{world} GPU(s)")
    result = {"checked": True, "world_size": world, "budget_gb": round(budget / GB, 3),
              "estimate_gb": {k: round(b[k] / GB, 3) for k in ("weights", "gradients", "optimizer", "activations",
                                                               "total")},
              "tokens_per_micro_batch": est["tokens_per_micro_batch"], "warnings": []}
    if b["state"] > budget:
        _refuse_state(model_name, est, params, budget=budget, where=where, world=world)
    verdict = memory_verdict(est, params, budget_bytes=budget, where=where, checkpointing=False)
    result.update(fits=bool(verdict["fits"]), fit=verdict["summary"], message=verdict["message"])
    if not verdict["fits"]:
        fix = (f"set finetune.per_device_train_batch_size={without['per_device_train_batch_size']} and "
               f"finetune.gradient_accumulation_steps={without['gradient_accumulation_steps']}"
               if (without := verdict["summary"]["largest_without_checkpointing"]) else
               f"set finetune.max_seq_length to at most {verdict['longest_max_seq_length']}")
        message = (f"{verdict['head']}; {fix} (an estimate of the local trainer's peak without gradient "
                   "checkpointing; the component's own may differ)")
        if refuse_activations:
            raise ConfigError(message)
        result["warnings"].append(message)
    return result


def _refuse_state(model_name: str, est: Dict[str, Any], params: Dict[str, Any], *, budget: float, where: str,
                  world: int) -> None:
    """ConfigError: weights + gradients + optimizer state alone exceed one GPU's budget; the message says what helps."""
    from runner.memory.terms import GB

    b = est["bytes"]
    apply_lora = bool(params.get("apply_lora"))
    mode = "LoRA" if apply_lora else "full"
    hints = []
    if not apply_lora:
        hints.append("finetune.apply_lora=true")
    if not params.get("apply_deepspeed") and world > 1:
        hints.append("finetune.apply_deepspeed=true (ZeRO shards the optimizer state over the GPUs)")
    elif params.get("apply_deepspeed") and int(params.get("deepspeed_stage", 2)) < 3 and world > 1:
        hints.append("finetune.deepspeed_stage=3 (shards the weights too)")
    hints.append("a compute size with more GPU memory")
    raise ConfigError(
        f"{mode} fine-tuning of {model_name} ({est['params_total'] / 1e9:.3g}B parameters) needs "
        f"~{b['state'] / GB:.1f} GB per GPU for weights + gradients + optimizer state alone, but {where} allows "
        f"{budget / GB:.1f} GB; try {' or '.join(hints)}"
    )
