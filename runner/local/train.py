"""The local fine-tune: transformers' Trainer (+ PEFT LoRA) on padding-free packed chat batches.

Why the Trainer and not TRL's SFTTrainer: the data is already tokenized with assistant-only labels
(runner/data/prepare.py) and packed by runner/local/packing.py, which is the part of SFT that matters here, and the
Trainer brings the rest (optimizers, schedulers, accumulation with correct loss normalisation, checkpoint/resume
with batch skipping, DeepSpeed, mixed precision, DDP) without SFTTrainer's per-step overhead and defaults
(gradient checkpointing on) — bench/train_throughput.py measures the difference against SFTTrainer.

What this module adds around it:
- evaluation as one token-weighted loss over the whole eval set (and its perplexity), before and during training;
- checkpoints marked complete only after everything is written, rotation that never deletes the only good one,
  resume from the newest complete checkpoint (runner/local/checkpoints.py);
- SIGTERM/SIGINT: save a checkpoint at the end of the current step and stop (TrainingInterrupted);
- events (train loss, learning rate, tokens/s; eval loss, perplexity) to log_fn and out_dir/metrics.jsonl, and a
  tqdm bar with loss and tokens/s;
- early stopping on eval loss (patience/threshold) with the best checkpoint kept and loaded at the end;
- the final model saved atomically as a plain transformers model + tokenizer (LoRA merged).
"""

import json
import math
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from runner.errors import RunnerError
from runner.local import checkpoints as ckpt
from runner.local import distributed
from runner.local.compute import base_weights_dtype, cpu_refusals

LogFn = Callable[[Dict[str, float], int], None]


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving a checkpoint; rerun with resume_from_checkpoint=true."""


# ---- settings ------------------------------------------------------------------------------------------------

def _check_settings(params: Dict[str, Any], local: Dict[str, Any], device: str) -> None:
    """Refuse what cannot run here before anything is loaded."""
    errors = cpu_refusals(params) if device != "cuda" else []
    if params.get("metric_for_best_model", "loss") != "loss":
        errors.append(f"finetune.metric_for_best_model={params['metric_for_best_model']!r} has no meaning for "
                      f"chat fine-tuning on this machine; use loss")
    if params.get("apply_lora") and not local.get("lora_target_modules"):
        errors.append("finetune.apply_lora=true needs finetune.local.lora_target_modules (e.g. [qkv_proj, o_proj])")
    if params.get("apply_lora") and params.get("apply_deepspeed") and int(params.get("deepspeed_stage", 2)) == 3:
        # ZeRO-3 shards the frozen base too; merging adapters into gathered shards is not implemented here. A LoRA
        # run's frozen base needs no optimizer state, so stage 2 already keeps it small.
        errors.append("finetune.apply_lora=true with finetune.deepspeed_stage=3 is not supported by the local "
                      "trainer; use deepspeed_stage=2 (finetune=lora_deepspeed2) or full fine-tuning with stage 3")
    if int(local.get("save_steps", 1)) < 1:
        errors.append(f"finetune.local.save_steps={local.get('save_steps')} must be >= 1")
    if errors:
        raise RunnerError("cannot fine-tune with these settings:\n  - " + "\n  - ".join(errors))


def _mixed_precision(params: Dict[str, Any], device: str) -> Dict[str, bool]:
    if params.get("precision", 32) != 16 or device != "cuda":
        return {"bf16": False, "fp16": False}
    import torch

    bf16 = torch.cuda.is_bf16_supported()
    return {"bf16": bf16, "fp16": not bf16}


def _steps_per_epoch(n_batches: int, grad_accum: int) -> int:
    return max(1, math.ceil(n_batches / max(1, grad_accum)))


# ---- events --------------------------------------------------------------------------------------------------

class _Events:
    """Every logging/evaluation event goes to log_fn and to metrics.jsonl (rank 0 only)."""

    def __init__(self, path: Path, log_fn: Optional[LogFn], enabled: bool, append: bool):
        self.path = path
        self.log_fn = log_fn
        self.enabled = enabled
        if enabled and not append and path.exists():
            path.unlink()

    def emit(self, kind: str, metrics: Dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": int(step), "kind": kind, "time": round(time.time(), 3), **metrics}) + "\n")
        if self.log_fn is not None and kind in distributed.LOGGED_KINDS:
            self.log_fn(metrics, int(step))


class _TokenMeter:
    """Real (non-padding) tokens trained on and the time spent training them (evaluation time excluded)."""

    def __init__(self):
        self.real = 0
        self.total = 0
        self.excluded_s = 0.0
        self.start = time.perf_counter()
        self._mark_tokens = 0
        self._mark_time = self.start
        self._mark_excluded = 0.0

    def add(self, real: int, total: int) -> None:
        self.real += real
        self.total += total

    def rate_since_mark(self) -> float:
        now = time.perf_counter()
        elapsed = (now - self._mark_time) - (self.excluded_s - self._mark_excluded)
        rate = (self.real - self._mark_tokens) / elapsed if elapsed > 0 else 0.0
        self._mark_tokens, self._mark_time, self._mark_excluded = self.real, now, self.excluded_s
        return rate

    def overall_rate(self) -> float:
        elapsed = time.perf_counter() - self.start - self.excluded_s
        return self.real / elapsed if elapsed > 0 else 0.0

    def padding_fraction(self) -> float:
        return 1.0 - self.real / self.total if self.total else 0.0


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


# ---- evaluation ----------------------------------------------------------------------------------------------

def evaluate_loss(model, dataset, batches, collator, device, autocast_dtype=None) -> float:
    """Mean loss over every assistant token of the eval set (token-weighted, not a mean of batch means)."""
    import contextlib

    import torch

    from runner.local.packing import packed_batch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for indices in batches:
                batch = collator([dataset[i] for i in indices])
                labels = batch.pop("labels").to(device)
                batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
                packed = packed_batch() if "cu_seq_lens_q" in batch else contextlib.nullcontext()
                amp = (torch.autocast(device_type="cuda", dtype=autocast_dtype) if autocast_dtype is not None
                       else contextlib.nullcontext())
                with packed, amp:
                    logits = model(**batch, use_cache=False).logits
                shifted = labels[:, 1:].reshape(-1)
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(), shifted, ignore_index=-100, reduction="sum"
                )
                total += float(loss)
                count += int((shifted != -100).sum())
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


# ---- the trainer ---------------------------------------------------------------------------------------------

def _make_trainer_class():
    import contextlib

    from torch.utils.data import DataLoader
    from transformers import Trainer

    from runner.local.packing import TokenBudgetBatchSampler, batch_token_counts, packed_batch

    class RunnerTrainer(Trainer):
        """Trainer with our batching, token-weighted evaluation and complete-or-ignored checkpoints."""

        def setup_runner(self, *, lengths, max_tokens, eval_dataset, eval_batches, eval_collator, meter, events,
                         keep_checkpoints, autocast_dtype):
            self._lengths = lengths
            self._max_tokens = max_tokens
            self._runner_eval = (eval_dataset, eval_batches, eval_collator)
            self._meter = meter
            self._events = events
            self._keep_checkpoints = keep_checkpoints
            self._autocast_dtype = autocast_dtype

        def get_train_dataloader(self):
            sampler = TokenBudgetBatchSampler(self._lengths, self._train_batch_size, self._max_tokens,
                                              seed=self.args.data_seed if self.args.data_seed is not None
                                              else self.args.seed)
            loader = DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                                num_workers=self.args.dataloader_num_workers,
                                pin_memory=self.args.dataloader_pin_memory)
            return self.accelerator.prepare(loader)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self._meter.add(*batch_token_counts(inputs))
            inputs = {**inputs, "use_cache": False}  # a cache would also disable the packed-sequence mask
            packed = packed_batch() if "cu_seq_lens_q" in inputs else contextlib.nullcontext()
            with packed:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            started = time.perf_counter()
            dataset, batches, collator = self._runner_eval
            model = self.model_wrapped if self.model_wrapped is not None else self.model
            loss = evaluate_loss(model, dataset, batches, collator, self.args.device, self._autocast_dtype)
            metrics = {f"{metric_key_prefix}_loss": loss, f"{metric_key_prefix}_perplexity": _perplexity(loss)}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
            self._meter.excluded_s += time.perf_counter() - started
            return metrics

        def _save_checkpoint(self, model, trial):
            started = time.perf_counter()
            super()._save_checkpoint(model, trial)  # args.save_total_limit is None: no rotation in there
            if self.args.should_save:
                folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
                ckpt.mark_complete(folder, self.state.global_step)
                best = self.state.best_global_step
                ckpt.rotate(self.args.output_dir, self._keep_checkpoints,
                            protect=f"checkpoint-{best}" if best else None)
            self._meter.excluded_s += time.perf_counter() - started

    return RunnerTrainer


def _make_callbacks(params, events: _Events, meter: _TokenMeter, progress: bool):
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class EventsAndProgress(TrainerCallback):
        def __init__(self):
            self.bar = None
            self.last_train: Dict[str, float] = {}
            self.last_eval: Dict[str, float] = {}
            self.last_eval_step = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="fine-tune", unit="step",
                                disable=not progress, dynamic_ncols=True)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)
            if state.global_step >= state.max_steps or control.should_training_stop:
                control.should_log = True  # the last steps' loss is logged too, whatever logging_steps says

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "eval_loss" in logs:
                self.last_eval = {"eval_loss": logs["eval_loss"], "perplexity": logs.get("eval_perplexity",
                                                                                          _perplexity(logs["eval_loss"]))}
                self.last_eval_step = state.global_step
                events.emit("eval", self.last_eval, state.global_step)
            elif "loss" in logs:
                self.last_train = {"train_loss": logs["loss"], "learning_rate": logs.get("learning_rate", 0.0),
                                   "tokens_per_s": meter.rate_since_mark()}
                if logs.get("grad_norm") is not None:
                    self.last_train["grad_norm"] = logs["grad_norm"]
                events.emit("train", self.last_train, state.global_step)
            if self.bar is not None and self.last_train:
                post = {"loss": f"{self.last_train['train_loss']:.3f}",
                        "tok/s": f"{self.last_train['tokens_per_s']:.0f}"}
                if self.last_eval:
                    post["eval"] = f"{self.last_eval['eval_loss']:.3f}"
                self.bar.set_postfix(post, refresh=False)

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()

    class EarlyStoppingOnLoss(TrainerCallback):
        """Tracks the best eval loss; with apply_early_stopping, saves on improvement and stops after `patience`
        evaluations without an improvement larger than `threshold`."""

        def __init__(self):
            self.enabled = bool(params.get("apply_early_stopping"))
            self.patience = max(1, int(params.get("early_stopping_patience", 1)))
            self.threshold = float(params.get("early_stopping_threshold", 0.0))
            self.best = None
            self.best_step = None
            self.waited = 0
            self.stopped_early = False

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            loss = (metrics or {}).get("eval_loss")
            if loss is None or math.isnan(loss):
                return
            if self.best is None or loss < self.best - self.threshold:
                self.best, self.best_step, self.waited = loss, state.global_step, 0
                state.best_metric, state.best_global_step = loss, state.global_step
                if self.enabled:
                    control.should_save = True  # keep the best weights on disk to load at the end
            else:
                self.waited += 1
                if self.enabled and self.waited >= self.patience:
                    self.stopped_early = True
                    control.should_training_stop = True
                    control.should_save = True

    class StopOnSignal(TrainerCallback):
        """SIGTERM/SIGINT: finish the current step, save a checkpoint, stop. A second SIGINT stops at once."""

        def __init__(self):
            self.received: Optional[str] = None
            self.previous = {}

        def _handler(self, signum, frame):
            if self.received is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.received = signal.Signals(signum).name

        def install(self):
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    self.previous[sig] = signal.signal(sig, self._handler)
                except ValueError:  # not the main thread: signals stay with whoever owns them
                    pass

        def restore(self):
            for sig, handler in self.previous.items():
                signal.signal(sig, handler)
            self.previous = {}

        def on_step_end(self, args, state, control, **kwargs):
            if self.received:
                control.should_save = True
                control.should_training_stop = True

    return EventsAndProgress(), EarlyStoppingOnLoss(), StopOnSignal()


# ---- model ---------------------------------------------------------------------------------------------------

def _load_model(model_dir, *, packing: bool, trust_remote_code: bool, ignore_mismatched_sizes: bool,
                dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    from runner.local.packing import register_packed_attention

    kwargs = dict(dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
                  ignore_mismatched_sizes=ignore_mismatched_sizes)
    if packing:
        try:
            return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=register_packed_attention(),
                                                        **kwargs), True
        except (ValueError, ImportError) as exc:  # a model without SDPA support: pad instead
            print(f"packing off: {type(exc).__name__}: {exc}", flush=True)
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs), False


def _apply_lora(model, params, local):
    from peft import LoraConfig, get_peft_model

    from runner.quiet import quiet_lora

    quiet_lora()

    config = LoraConfig(
        r=int(params["lora_r"]),
        lora_alpha=int(params["lora_alpha"]),
        lora_dropout=float(params["lora_dropout"]),
        target_modules=list(local.get("lora_target_modules") or []),
        modules_to_save=list(local.get("lora_modules_to_save") or []) or None,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n})
        raise RunnerError(f"LoRA cannot be applied: {exc}. finetune.local.lora_target_modules="
                          f"{local.get('lora_target_modules')}; module names in this model: {names}") from None


def count_parameters(model) -> Dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": int(trainable), "total_params": int(total)}


def _zero3_state_dict(trainer) -> Optional[Dict[str, Any]]:
    """Under DeepSpeed ZeRO-3 each rank holds only a shard of every weight (the module's own tensors are empty
    placeholders), so the final save needs the whole 16-bit weights gathered from all ranks; None otherwise."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None) if trainer.is_deepspeed_enabled else None
    if plugin is None or int(plugin.zero_stage or 0) != 3:
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


def _save_final(model, tokenizer, out: Path, params, state_dict=None) -> Dict[str, Any]:
    """A plain transformers model + tokenizer in out/final_model, written to a temp folder and renamed; with LoRA
    not merged by request, the adapter is kept in out/adapter too (the final model is still a merged copy, since
    only a plain model registers and serves faithfully)."""
    from runner.local.packing import PACKED_ATTENTION

    info: Dict[str, Any] = {"lora_merged": None, "adapter_dir": None}
    if params.get("apply_lora"):
        if not params.get("merge_lora_weights", True):
            adapter_tmp = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=out))
            model.save_pretrained(adapter_tmp)
            tokenizer.save_pretrained(adapter_tmp)
            ckpt.replace_dir_atomically(adapter_tmp, out / "adapter")
            info["adapter_dir"] = str(out / "adapter")
            info["note"] = ("merge_lora_weights=false: the LoRA adapter is kept in adapter_dir; final_model_dir "
                            "holds a merged copy so the model can be registered and served as a plain model")
        model = model.merge_and_unload()
        info["lora_merged"] = bool(params.get("merge_lora_weights", True))
    model.config.use_cache = True
    if getattr(model.config, "_attn_implementation", None) == PACKED_ATTENTION:
        model.set_attn_implementation("sdpa")  # the saved model must load without this module
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-final-", dir=out))
    try:
        model.save_pretrained(tmp, state_dict=state_dict)  # state_dict: ZeRO-3's gathered weights, else None
        tokenizer.save_pretrained(tmp)
        ckpt.replace_dir_atomically(tmp, out / "final_model")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info["final_model_dir"] = str(out / "final_model")
    return info


# ---- the entry point -----------------------------------------------------------------------------------------

def train(*, model_dir, train_file, eval_file, params: dict, local: dict, out_dir, device="cpu",
          trust_remote_code=False, log_fn: Optional[LogFn] = None, cache_dir=None, progress=True) -> dict:
    """Fine-tune the model in model_dir on train_file; see the module docstring. Returns JSON-serialisable
    figures and paths (final_model_dir, checkpoints_dir, global_step, train_loss, eval_loss_before, eval_loss,
    perplexity, tokens_per_s, train_runtime_s, trainable_params, total_params, resumed_from, metrics_file,
    padding_fraction, ...)."""
    started = time.time()
    device = "cuda" if device == "auto" and _cuda_count() else ("cpu" if device == "auto" else device)
    _check_settings(params, local, device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    nproc = distributed.processes_needed(params, local, device, _cuda_count() if device == "cuda" else 0)
    if nproc:
        kwargs = dict(model_dir=str(model_dir), train_file=str(train_file),
                      eval_file=str(eval_file) if eval_file else None, params=params, local=local,
                      out_dir=str(out), device=device, trust_remote_code=trust_remote_code,
                      cache_dir=str(cache_dir) if cache_dir else None, progress=progress)
        return distributed.launch(nproc, out, kwargs, log_fn=log_fn)

    import torch
    from transformers import AutoTokenizer, TrainingArguments, enable_full_determinism, set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from runner.data.prepare import tokenize_file_with_stats
    from runner.local.packing import (PaddedCollator, TokenBudgetBatchSampler, avoid_per_shape_attention_plans,
                                      pack_conversations)

    if device == "cuda":
        avoid_per_shape_attention_plans()

    seed = int(params.get("seed", 42))
    (enable_full_determinism if params.get("enable_full_determinism") else set_seed)(seed)
    is_main = int(os.environ.get("RANK", "0")) == 0

    # -- data --
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    cache = Path(cache_dir) if cache_dir else out / "tokenized"
    max_len = int(params.get("max_seq_length", -1))
    train_ds, train_stats = tokenize_file_with_stats(train_file, tokenizer, max_len, cache_dir=cache,
                                                     progress=progress and is_main)
    if int(local.get("max_train_rows") or 0) > 0:
        train_ds = train_ds.select(range(min(len(train_ds), int(local["max_train_rows"]))))
    eval_ds = None
    if eval_file:
        eval_ds, _ = tokenize_file_with_stats(eval_file, tokenizer, max_len, cache_dir=cache,
                                              progress=progress and is_main)
        if int(local.get("max_eval_rows") or 0) > 0:
            eval_ds = eval_ds.select(range(min(len(eval_ds), int(local["max_eval_rows"]))))
    if len(train_ds) == 0:
        raise RunnerError(f"{train_file}: no conversation with an assistant turn left to train on")

    # -- model --
    precision = _mixed_precision(params, device)
    model, packing = _load_model(model_dir, packing=bool(local.get("packing", True)),
                                 trust_remote_code=trust_remote_code,
                                 ignore_mismatched_sizes=bool(params.get("ignore_mismatched_sizes")),
                                 dtype=base_weights_dtype(params, local, precision))
    model.config.use_cache = False
    if params.get("apply_lora"):
        model = _apply_lora(model, params, local)
    counts = count_parameters(model)

    bs = int(params["per_device_train_batch_size"])
    lengths = [len(x) for x in train_ds["input_ids"]]  # reading the column materialises it: once
    effective_len = train_stats["max_seq_length"] or max(lengths)
    max_tokens = int(local.get("max_tokens_per_batch") or 0) if packing else 0
    collator = pack_conversations if packing else PaddedCollator(
        tokenizer.pad_token_id, pad_to=effective_len if params.get("pad_to_max_length") else None)
    grad_accum = int(params.get("gradient_accumulation_steps", 1))
    steps_per_epoch = _steps_per_epoch(len(TokenBudgetBatchSampler(lengths, bs, max_tokens, seed)), grad_accum)
    eval_batches = (TokenBudgetBatchSampler([len(x) for x in eval_ds["input_ids"]],
                                            int(params["per_device_eval_batch_size"]), max_tokens,
                                            shuffle=False).batches() if eval_ds is not None and len(eval_ds) else [])

    # -- checkpoints: fresh start or resume --
    ckpt_dir = out / "checkpoints"
    resumed_from = None
    removed = []
    if params.get("resume_from_checkpoint"):
        removed = ckpt.remove_incomplete(ckpt_dir)
        latest = ckpt.latest_complete(ckpt_dir)
        resumed_from = str(latest) if latest else None
    elif ckpt_dir.exists() and is_main:
        shutil.rmtree(ckpt_dir)
    for folder in removed:
        print(f"ignored incomplete checkpoint {folder}", flush=True)
    metrics_file = out / "metrics.jsonl"
    events = _Events(metrics_file, log_fn, enabled=is_main, append=resumed_from is not None)
    meter = _TokenMeter()

    # -- evaluation settings --
    strategy = params.get("evaluation_strategy", "epoch")
    if eval_ds is None or not eval_batches or strategy == "disable":
        eval_strategy, eval_steps = "no", None
    elif strategy == "steps":
        eval_strategy = "steps"
        interval = float(params.get("evaluation_steps_interval") or 0.0)
        eval_steps = max(1, round(interval * steps_per_epoch)) if interval > 0 else int(params.get("eval_steps", 500))
    else:
        eval_strategy, eval_steps = "epoch", None
    autocast_dtype = (torch.bfloat16 if precision["bf16"] else torch.float16) if any(precision.values()) else None

    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        num_train_epochs=float(params.get("num_train_epochs", 1)),
        max_steps=int(params.get("max_steps", -1)),
        per_device_train_batch_size=bs,
        per_device_eval_batch_size=int(params.get("per_device_eval_batch_size", 1)),
        gradient_accumulation_steps=grad_accum,
        learning_rate=float(params["learning_rate"]),
        lr_scheduler_type=params.get("lr_scheduler_type", "linear"),
        warmup_steps=int(params.get("warmup_steps", 0)),
        weight_decay=float(params.get("weight_decay", 0.0)),
        adam_beta1=float(params.get("adam_beta1", 0.9)),
        adam_beta2=float(params.get("adam_beta2", 0.999)),
        adam_epsilon=float(params.get("adam_epsilon", 1e-8)),
        optim=params.get("optim", "adamw_torch"),
        max_grad_norm=float(params.get("max_grad_norm", 1.0)),
        seed=seed,
        full_determinism=bool(params.get("enable_full_determinism")),
        eval_strategy=eval_strategy,
        eval_steps=eval_steps,
        logging_strategy=params.get("logging_strategy", "steps"),
        logging_steps=int(params.get("logging_steps", 10)),
        logging_first_step=True,
        save_strategy="steps",
        save_steps=int(local.get("save_steps", 50)),
        save_total_limit=None,  # rotation is ours (after the completion marker), see RunnerTrainer
        eval_accumulation_steps=(int(params["eval_accumulation_steps"])
                                 if int(params.get("eval_accumulation_steps", -1) or -1) > 0 else None),
        dataloader_num_workers=int(params.get("dataloader_num_workers", 0)),
        auto_find_batch_size=bool(params.get("auto_find_batch_size")),
        deepspeed=distributed.write_deepspeed_config(out, params),
        use_cpu=device != "cuda",
        remove_unused_columns=False,
        report_to="none",
        disable_tqdm=True,
        **precision,
    )
    keep = int(params.get("save_total_limit", -1))
    trainer = _make_trainer_class()(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds if eval_strategy != "no" else None,
                                    data_collator=collator,
                                    processing_class=tokenizer)
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    progress_cb, best_cb, signal_cb = _make_callbacks(params, events, meter, progress and is_main)
    for cb in (progress_cb, best_cb, signal_cb):
        trainer.add_callback(cb)
    trainer.setup_runner(lengths=lengths, max_tokens=max_tokens, eval_dataset=eval_ds, eval_batches=eval_batches,
                         eval_collator=collator, meter=meter, events=events,
                         keep_checkpoints=keep if keep > 0 else None, autocast_dtype=autocast_dtype)

    # -- eval before training (kept from the first session when resuming) --
    before_file = out / "eval_before.json"
    eval_before = None
    if resumed_from and before_file.exists():
        eval_before = json.loads(before_file.read_text()).get("eval_loss")
    elif eval_batches and local.get("eval_before_training", True):
        eval_before = evaluate_loss(model.to(args.device), eval_ds, eval_batches, collator, args.device,
                                    autocast_dtype)
        if is_main:
            ckpt.write_atomic(before_file, json.dumps({"eval_loss": eval_before}))
        events.emit("eval", {"eval_loss": eval_before, "perplexity": _perplexity(eval_before)}, 0)

    # -- train --
    signal_cb.install()
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" at every checkpoint would break our bar
    try:
        if signal_cb.received:
            raise TrainingInterrupted(f"stopped by {signal_cb.received} before training started")
        meter.start = time.perf_counter()
        meter._mark_time = meter.start
        train_started, cpu_started = time.perf_counter(), time.process_time()
        output = trainer.train(resume_from_checkpoint=resumed_from)
        train_runtime, train_cpu = time.perf_counter() - train_started, time.process_time() - cpu_started
    finally:
        signal_cb.restore()
        if bars_were_on:
            hf_logging.enable_progress_bar()
    step = trainer.state.global_step
    if signal_cb.received:
        latest = ckpt.latest_complete(ckpt_dir)
        raise TrainingInterrupted(
            f"stopped by {signal_cb.received} at step {step}; checkpoint {latest} saved. Run again with "
            f"finetune.resume_from_checkpoint=true to continue")

    # The final eval: reuse the one made at this very step, else measure now.
    last_eval = progress_cb.last_eval if progress_cb.last_eval_step == step else {}
    loaded_best = None
    if params.get("apply_early_stopping") and best_cb.best_step not in (None, step):
        best_dir = ckpt_dir / f"checkpoint-{best_cb.best_step}"
        if ckpt.is_complete(best_dir):
            trainer._load_from_checkpoint(str(best_dir))
            loaded_best = str(best_dir)
            last_eval = {}
    if not last_eval and eval_batches:
        loss = evaluate_loss(trainer.model, eval_ds, eval_batches, collator, args.device, autocast_dtype)
        last_eval = {"eval_loss": loss, "perplexity": _perplexity(loss)}
        if loaded_best is None:
            events.emit("eval", last_eval, step)

    result: Dict[str, Any] = {
        "final_model_dir": None,
        "checkpoints_dir": str(ckpt_dir),
        "global_step": int(step),
        "epochs": float(trainer.state.epoch or 0.0),
        "train_loss": progress_cb.last_train.get("train_loss", float(output.training_loss)),
        "train_loss_mean": float(output.training_loss),
        "eval_loss_before": eval_before,
        "eval_loss": last_eval.get("eval_loss"),
        "perplexity": last_eval.get("perplexity"),
        "best_eval_loss": best_cb.best,
        "best_step": best_cb.best_step,
        "stopped_early": best_cb.stopped_early,
        "loaded_best_checkpoint": loaded_best,
        "tokens_per_s": meter.overall_rate(),
        "train_tokens": meter.real,
        "padding_fraction": meter.padding_fraction(),
        "train_runtime_s": train_runtime,
        "train_cpu_s": train_cpu,  # CPU seconds of this process: a load-independent cost figure
        "wall_time_s": None,
        "resumed_from": resumed_from,
        "ignored_incomplete_checkpoints": removed,
        "metrics_file": str(metrics_file),
        "packing": packing,
        "steps_per_epoch": steps_per_epoch,
        "train_rows": len(train_ds),
        "eval_rows": len(eval_ds) if eval_ds is not None else 0,
        "truncated_rows": train_stats["truncated"],
        "dropped_rows": train_stats["dropped_no_assistant"],
        "tokenized_cache_hit": train_stats["cache_hit"],
        "precision": "bf16" if precision["bf16"] else ("fp16" if precision["fp16"] else "fp32"),
        "device": device,
        # measured, to set against the compute step's estimate (this process's GPU; every rank holds as much)
        "peak_gpu_memory_gb": (torch.cuda.max_memory_allocated() / 1e9) if device == "cuda" else None,
        **counts,
    }
    gathered = _zero3_state_dict(trainer)  # a collective: every rank takes part, rank 0 gets the weights
    if is_main:
        result.update(_save_final(trainer.model, tokenizer, out, params, state_dict=gathered))
        result["wall_time_s"] = time.time() - started
        events.emit("summary", {k: v for k, v in result.items() if isinstance(v, (int, float))}, step)
        ckpt.write_atomic(out / distributed.RESULT_FILE, json.dumps(result, indent=1, default=str))
    return result


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install reads as no GPU
        return 0
