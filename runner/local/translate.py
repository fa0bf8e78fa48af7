"""Effective finetune params + finetune.local → the local trainer's plan (the counterpart of
runner/azureml/translate.py).

Every component key (runner/finetune_params.COMPONENT_KEYS) has exactly one place in the tables below:
- TRAINING_ARGUMENTS: copied into a transformers.TrainingArguments field (converted, never defaulted);
- AT_RUN_TIME: feeds TrainingArguments once the run knows what only it can know (the device, the eval rows, the
  steps per epoch, the DeepSpeed JSON's path);
- RECIPE: used by the recipe itself (tokenization, collator, LoRA, callbacks, resume, the final save);
- NOT_LOCAL: means nothing on this machine; kept in `plan.ignored` and said as a note when set to anything but the
  schema's value, never dropped in silence.
LOCAL_KEYS does the same for finetune.local.

The values come from the merged params and the local block, which already hold the schema's defaults
(runner/schema.py): a key missing here is a bug upstream, so it is refused by name rather than given a second
default. A key no table knows is refused too. Nothing here imports torch or transformers: a dry run can show the
plan (`LocalTrainingPlan.describe()`).
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from runner.errors import RunnerError


def _positive_or_none(value: Any) -> Optional[int]:
    """eval_accumulation_steps: the component's -1 (or 0) means "not set", which TrainingArguments spells None."""
    return int(value) if value and int(value) > 0 else None


# component key -> (TrainingArguments field, conversion)
TRAINING_ARGUMENTS: Dict[str, Tuple[str, Callable[[Any], Any]]] = {
    "num_train_epochs": ("num_train_epochs", float),
    "max_steps": ("max_steps", int),
    "per_device_train_batch_size": ("per_device_train_batch_size", int),
    "per_device_eval_batch_size": ("per_device_eval_batch_size", int),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", int),
    "learning_rate": ("learning_rate", float),
    "lr_scheduler_type": ("lr_scheduler_type", str),
    "warmup_steps": ("warmup_steps", int),
    "weight_decay": ("weight_decay", float),
    "adam_beta1": ("adam_beta1", float),
    "adam_beta2": ("adam_beta2", float),
    "adam_epsilon": ("adam_epsilon", float),
    "optim": ("optim", str),
    "max_grad_norm": ("max_grad_norm", float),
    "seed": ("seed", int),
    "enable_full_determinism": ("full_determinism", bool),
    "logging_strategy": ("logging_strategy", str),
    "logging_steps": ("logging_steps", int),
    "eval_accumulation_steps": ("eval_accumulation_steps", _positive_or_none),
    "dataloader_num_workers": ("dataloader_num_workers", int),
    "auto_find_batch_size": ("auto_find_batch_size", bool),
}

# component key -> where it goes once the run knows the device / data
AT_RUN_TIME: Dict[str, str] = {
    "evaluation_strategy": "TrainingArguments.eval_strategy (epoch/steps; 'no' with disable or without eval rows)",
    "eval_steps": "TrainingArguments.eval_steps (evaluation_strategy=steps without evaluation_steps_interval)",
    "evaluation_steps_interval": "TrainingArguments.eval_steps = round(interval * optimizer steps per epoch)",
    "precision": "TrainingArguments.bf16/fp16 on CUDA (bf16 where supported), fp32 otherwise",
    "apply_deepspeed": "TrainingArguments.deepspeed (the JSON written to the run folder) + the torchrun launch",
    "deepspeed_stage": "TrainingArguments.deepspeed: the generated ZeRO stage (runner/local/distributed.py)",
    "deepspeed": "TrainingArguments.deepspeed: the user's JSON instead of a generated one",
    "save_total_limit": "checkpoint rotation after the completion marker (TrainingArguments.save_total_limit=None)",
}

# component key -> what the recipe does with it
RECIPE: Dict[str, str] = {
    "max_seq_length": "tokenization: conversations truncated to this many tokens (-1: the model's limit)",
    "pad_to_max_length": "padded collator (packing off): pad every batch to the longest train row",
    "apply_lora": "peft.get_peft_model with the LoRA config",
    "lora_r": "LoraConfig.r",
    "lora_alpha": "LoraConfig.lora_alpha",
    "lora_dropout": "LoraConfig.lora_dropout",
    "merge_lora_weights": "final save: false keeps the adapter too (final_model is always merged)",
    "ignore_mismatched_sizes": "AutoModelForCausalLM.from_pretrained(ignore_mismatched_sizes=...)",
    "resume_from_checkpoint": "Trainer.train(resume_from_checkpoint=<newest complete checkpoint>)",
    "apply_early_stopping": "early stopping on eval loss, best checkpoint loaded at the end",
    "early_stopping_patience": "early stopping: evaluations without improvement before stopping (at least 1)",
    "early_stopping_threshold": "early stopping: the improvement in eval loss that counts",
    "metric_for_best_model": "the best checkpoint's metric: eval loss is the only one measured here (others refused)",
}

# component key -> why it means nothing locally
NOT_LOCAL: Dict[str, str] = {
    "apply_ort": "ONNX Runtime training is an option of the Azure component; the local trainer runs PyTorch",
    "shm_size_finetune": "the Azure job container's /dev/shm size; the local trainer runs in no container",
    "num_nodes_finetune": "the local trainer runs on one machine (the compute step refuses more than 1 node)",
    "batch_size": "the Azure preprocess component's map batch size; local tokenization is cached per file",
}

# finetune.local key -> what uses it
LOCAL_KEYS: Dict[str, str] = {
    "packing": "padding-free packed batches (packed SDPA attention); false: padded batches",
    "lora_target_modules": "LoraConfig.target_modules",
    "lora_modules_to_save": "LoraConfig.modules_to_save",
    "save_steps": "TrainingArguments.save_steps (save_strategy=steps)",
    "eval_before_training": "the base model's eval loss before the first step",
    "max_eval_rows": "eval rows used (0: all)",
    "max_train_rows": "train rows used (0: all)",
    "max_tokens_per_batch": "packing: tokens per micro-batch (0: batch size * longest row)",
    "num_gpus": "torchrun workers (0: every visible GPU), decided by the caller of train()",
    "gradient_checkpointing": "TrainingArguments.activation_checkpointing (non-reentrant); auto: the compute step's "
                              "decision, or the same rule against this device's free memory",
    "auto_fit": "the compute step's choice of micro-batch; the finetune step runs the batch size and accumulation "
                "it chose",
    "chunked_loss": "the training loss over chunks of labelled tokens, lm_head + log-softmax recomputed per chunk "
                    "in the backward (runner/local/loss.py); false: the model's own loss over the full logits",
    "packed_attention": "the attention of packed batches: per_conversation (SDPA per conversation) or varlen (one "
                        "flash-attention varlen kernel per layer; CUDA) (runner/local/packing.py)",
    "compile": "torch.compile of every decoder layer (runner/local/speed.py)",
}


def destination(key: str) -> str:
    """Where a component key goes in the local trainer, in words."""
    if key in TRAINING_ARGUMENTS:
        return f"TrainingArguments.{TRAINING_ARGUMENTS[key][0]}"
    for table in (AT_RUN_TIME, RECIPE):
        if key in table:
            return table[key]
    if key in NOT_LOCAL:
        return f"not used locally: {NOT_LOCAL[key]}"
    raise RunnerError(f"finetune.{key} is not a key the local trainer knows")


def _schema_values() -> Dict[str, Any]:
    from runner.schema import FinetuneConfig

    return {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.default is not dataclasses.MISSING}


@dataclass(frozen=True)
class LocalTrainingPlan:
    """What the local trainer will do with a run's settings. `training_args` holds the TrainingArguments keywords
    the settings fix; `training_arguments()` adds what the run decides (device, eval schedule, DeepSpeed file)."""

    training_args: Dict[str, Any]
    # evaluation
    evaluation_strategy: str
    eval_steps: int
    evaluation_steps_interval: float
    eval_before_training: bool
    # data
    max_seq_length: int
    pad_to_max_length: bool
    packing: bool
    max_tokens_per_batch: int
    max_train_rows: int
    max_eval_rows: int
    # model
    precision: int
    ignore_mismatched_sizes: bool
    lora: Optional[Dict[str, Any]]  # LoraConfig keywords; None without apply_lora
    merge_lora_weights: bool
    # distributed
    apply_deepspeed: bool
    deepspeed_stage: int
    deepspeed_file: Optional[str]
    num_gpus: int
    gradient_checkpointing: Any  # "auto", True or False
    # checkpoints and stopping
    save_steps: int
    keep_checkpoints: Optional[int]  # None: keep all
    resume: bool
    metric_for_best_model: str
    early_stopping: bool
    early_stopping_patience: int
    early_stopping_threshold: float
    # what each key fed, what means nothing here, and what to tell the user about it
    sources: Dict[str, str] = field(default_factory=dict)
    ignored: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    # the inputs, as given (the compute helpers and the torchrun launch spec take them)
    params: Dict[str, Any] = field(default_factory=dict, repr=False)
    local: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def seed(self) -> int:
        return self.training_args["seed"]

    @property
    def apply_lora(self) -> bool:
        return self.lora is not None

    def eval_schedule(self, steps_per_epoch: int, has_eval_rows: bool) -> Tuple[str, Optional[int]]:
        """TrainingArguments (eval_strategy, eval_steps) for this run."""
        if not has_eval_rows or self.evaluation_strategy == "disable":
            return "no", None
        if self.evaluation_strategy == "steps":
            if self.evaluation_steps_interval > 0:
                return "steps", max(1, round(self.evaluation_steps_interval * steps_per_epoch))
            return "steps", self.eval_steps
        return "epoch", None

    def training_arguments(self, *, output_dir: str, eval_strategy: str, eval_steps: Optional[int],
                           deepspeed: Optional[str], use_cpu: bool, bf16: bool, fp16: bool,
                           gradient_checkpointing: bool = False) -> Dict[str, Any]:
        """Every TrainingArguments keyword of the run (gradient_checkpointing: this plan's, "auto" resolved)."""
        if self.gradient_checkpointing != "auto" and self.gradient_checkpointing != gradient_checkpointing:
            raise RunnerError(f"gradient_checkpointing={gradient_checkpointing} contradicts "
                              f"finetune.local.gradient_checkpointing={self.gradient_checkpointing}")
        # non-reentrant: the recomputed forward gets the packed batch's keyword arguments too (transformers 5
        # names gradient checkpointing activation_checkpointing)
        checkpointing = ({"activation_checkpointing": True,
                          "activation_checkpointing_kwargs": {"use_reentrant": False}}
                         if gradient_checkpointing else {})
        return {
            "output_dir": output_dir,
            **self.training_args,
            "eval_strategy": eval_strategy,
            "eval_steps": eval_steps,
            "logging_first_step": True,
            "save_strategy": "steps",
            "save_steps": self.save_steps,
            "save_total_limit": None,  # rotation is ours, after the completion marker (train.RunnerTrainer)
            "deepspeed": deepspeed,
            "use_cpu": use_cpu,
            "remove_unused_columns": False,
            "report_to": "none",
            "disable_tqdm": True,
            "bf16": bf16,
            "fp16": fp16,
            **checkpointing,
        }

    def refusals(self, device: str) -> List[str]:
        """What cannot run with these settings on `device` ("cpu"/"cuda"), before anything is loaded."""
        from runner.local.compute import cpu_refusals

        errors = cpu_refusals(self.params) if device != "cuda" else []
        if self.metric_for_best_model != "loss":
            errors.append(f"finetune.metric_for_best_model={self.metric_for_best_model!r} has no meaning for "
                          f"chat fine-tuning on this machine; use loss")
        if self.apply_lora and not self.lora["target_modules"]:
            errors.append("finetune.apply_lora=true needs finetune.local.lora_target_modules (e.g. [qkv_proj, o_proj])")
        if self.apply_lora and self.apply_deepspeed and self.deepspeed_stage == 3:
            # ZeRO-3 shards the frozen base too; merging adapters into gathered shards is not implemented here. A
            # LoRA run's frozen base needs no optimizer state, so stage 2 already keeps it small.
            errors.append("finetune.apply_lora=true with finetune.deepspeed_stage=3 is not supported by the local "
                          "trainer; use deepspeed_stage=2 (finetune=lora_deepspeed2) or full fine-tuning with stage 3")
        if self.save_steps < 1:
            errors.append(f"finetune.local.save_steps={self.save_steps} must be >= 1")
        errors += self._speed_refusals(device)
        return errors

    def _speed_refusals(self, device: str) -> List[str]:
        """The speed levers (packed_attention, compile) where they cannot run: said before anything loads."""
        errors = []
        if self.local.get("packed_attention", "per_conversation") == "varlen":
            from runner.local.packing import varlen_refusal

            cannot = varlen_refusal(device)
            if not self.packing:
                errors.append("finetune.local.packed_attention=varlen is the attention of packed batches: it needs "
                              "finetune.local.packing=true")
            elif cannot:
                errors.append(cannot)
            elif int(self.precision) != 16:
                errors.append(f"finetune.local.packed_attention=varlen takes 16-bit inputs (flash attention): it "
                              f"needs finetune.precision=16, not {self.precision}")
        from runner.local.speed import compile_refusal

        never_compiles = compile_refusal(self.local, packing=self.packing,
                                         checkpointing=self.gradient_checkpointing is True)
        if never_compiles:
            errors.append(never_compiles)
        if self.local.get("compile") and self.apply_deepspeed:
            # ZeRO gathers and frees parameters with hooks inside the layers that a compiled graph would skip
            errors.append("finetune.local.compile=true is not supported with DeepSpeed here; set compile=false")
        return errors

    def check(self, device: str) -> None:
        errors = self.refusals(device)
        if errors:
            raise RunnerError("cannot fine-tune with these settings:\n  - " + "\n  - ".join(errors))

    def describe(self) -> Dict[str, Any]:
        """The plan as plain data (for a dry run's plan files or a log)."""
        out = dataclasses.asdict(self)
        out.pop("params")
        out.pop("local")
        return out


def _checkpointing(value: Any) -> Any:
    """finetune.local.gradient_checkpointing as "auto", True or False (the compute step may have resolved it)."""
    from runner.memory.terms import checkpointing_setting

    try:
        mode = checkpointing_setting(value)
    except ValueError as exc:
        raise RunnerError(str(exc)) from None
    return mode if mode == "auto" else mode == "true"


def translate(params: Mapping[str, Any], local: Mapping[str, Any]) -> LocalTrainingPlan:
    """The local trainer's plan for the effective params (component keys) and finetune.local. Refuses a missing
    or unknown key by name; notes every key that means nothing here and is set to anything but the schema's value."""
    from runner.finetune_params import COMPONENT_KEYS

    known = set(TRAINING_ARGUMENTS) | set(AT_RUN_TIME) | set(RECIPE) | set(NOT_LOCAL)
    errors = [f"finetune.{k} is missing from the effective params" for k in COMPONENT_KEYS if k not in params]
    errors += [f"finetune.{k} is not a key the local trainer knows" for k in params if k not in known]
    errors += [f"finetune.local.{k} is missing" for k in LOCAL_KEYS if k not in local]
    errors += [f"finetune.local.{k} is not a key the local trainer knows" for k in local if k not in LOCAL_KEYS]
    if errors:
        raise RunnerError("cannot translate the finetune settings for the local trainer:\n  - " + "\n  - ".join(errors))

    p, lo = dict(params), dict(local)
    training_args = {ta_field: convert(p[key]) for key, (ta_field, convert) in TRAINING_ARGUMENTS.items()}
    sources = {key: destination(key) for key in p}
    sources.update({f"local.{key}": what for key, what in LOCAL_KEYS.items()})

    schema = _schema_values()
    ignored = {key: p[key] for key in NOT_LOCAL if key in p}
    notes = [f"finetune.{key}={value!r} is not used by the local trainer: {NOT_LOCAL[key]}"
             for key, value in ignored.items() if key in schema and value != schema[key]]

    lora = None
    if bool(p["apply_lora"]):
        lora = {
            "r": int(p["lora_r"]),
            "lora_alpha": int(p["lora_alpha"]),
            "lora_dropout": float(p["lora_dropout"]),
            "target_modules": list(lo["lora_target_modules"] or []),
            "modules_to_save": list(lo["lora_modules_to_save"] or []) or None,
            "task_type": "CAUSAL_LM",
        }
    keep = int(p["save_total_limit"])
    return LocalTrainingPlan(
        training_args=training_args,
        evaluation_strategy=str(p["evaluation_strategy"]),
        eval_steps=int(p["eval_steps"]),
        evaluation_steps_interval=float(p["evaluation_steps_interval"] or 0.0),
        eval_before_training=bool(lo["eval_before_training"]),
        max_seq_length=int(p["max_seq_length"]),
        pad_to_max_length=bool(p["pad_to_max_length"]),
        packing=bool(lo["packing"]),
        max_tokens_per_batch=int(lo["max_tokens_per_batch"] or 0),
        max_train_rows=int(lo["max_train_rows"] or 0),
        max_eval_rows=int(lo["max_eval_rows"] or 0),
        precision=int(p["precision"]),
        ignore_mismatched_sizes=bool(p["ignore_mismatched_sizes"]),
        lora=lora,
        merge_lora_weights=bool(p["merge_lora_weights"]),
        apply_deepspeed=bool(p["apply_deepspeed"]),
        deepspeed_stage=int(p["deepspeed_stage"]),
        deepspeed_file=p["deepspeed"] or None,
        num_gpus=int(lo["num_gpus"] or 0),
        gradient_checkpointing=_checkpointing(lo["gradient_checkpointing"]),
        save_steps=int(lo["save_steps"]),
        keep_checkpoints=keep if keep > 0 else None,
        resume=bool(p["resume_from_checkpoint"]),
        metric_for_best_model=str(p["metric_for_best_model"]),
        early_stopping=bool(p["apply_early_stopping"]),
        early_stopping_patience=max(1, int(p["early_stopping_patience"])),
        early_stopping_threshold=float(p["early_stopping_threshold"]),
        sources=sources,
        ignored=ignored,
        notes=notes,
        params=p,
        local=lo,
    )
