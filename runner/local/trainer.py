"""The local fine-tune: transformers' Trainer (+ PEFT LoRA) on padding-free packed chat batches.

This module holds the building blocks that the recipe (runner/local/recipe.py: setup → train → save, cleanup)
assembles; `train()` (runner/local/train.py) is the entry point that the local backend and every torchrun worker
(runner/local/distributed.py) call.

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
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from runner.errors import RunnerError
from runner.local import checkpoints as ckpt
from runner.local.launch_plan import LOGGED_KINDS

LogFn = Callable[[Dict[str, float], int], None]


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving a checkpoint; rerun with resume_from_checkpoint=true."""


# ---- settings ------------------------------------------------------------------------------------------------

def mixed_precision(precision: int, device: str) -> Dict[str, bool]:
    """TrainingArguments bf16/fp16 for finetune.precision on this device: 16-bit only on CUDA, bf16 where supported."""
    if precision != 16 or device != "cuda":
        return {"bf16": False, "fp16": False}
    import torch

    bf16 = torch.cuda.is_bf16_supported()
    return {"bf16": bf16, "fp16": not bf16}


def steps_per_epoch(n_batches: int, grad_accum: int) -> int:
    return max(1, math.ceil(n_batches / max(1, grad_accum)))


# ---- events --------------------------------------------------------------------------------------------------

class Events:
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
        if self.log_fn is not None and kind in LOGGED_KINDS:
            self.log_fn(metrics, int(step))


class TokenMeter:
    """Real (non-padding) tokens trained on and the time spent training them (evaluation time excluded)."""

    def __init__(self):
        self.real = 0
        self.total = 0
        self.excluded_s = 0.0
        self.start = time.perf_counter()
        self._mark_tokens = 0
        self._mark_time = self.start
        self._mark_excluded = 0.0

    def restart(self) -> None:
        self.start = self._mark_time = time.perf_counter()

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


def perplexity(loss: float) -> float:
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

def make_trainer_class():
    import contextlib

    from torch.utils.data import DataLoader
    from transformers import Trainer

    from runner.local.packing import TokenBudgetBatchSampler, batch_token_counts, packed_batch

    class RunnerTrainer(Trainer):
        """Trainer with our batching, token-weighted evaluation and complete-or-ignored checkpoints."""

        def setup_runner(self, *, lengths, max_tokens, eval_dataset, eval_batches, eval_collator, meter, events,
                         keep_checkpoints, autocast_dtype, chunked_loss=False):
            self._chunked_loss = chunked_loss
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
            if getattr(self, "_chunked_loss", False) and "labels" in inputs and not return_outputs:
                return chunked_trainer_loss(self, model, inputs, packed, num_items_in_batch)
            with packed:
                return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                            num_items_in_batch=num_items_in_batch)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            started = time.perf_counter()
            dataset, batches, collator = self._runner_eval
            model = self.model_wrapped if self.model_wrapped is not None else self.model
            loss = evaluate_loss(model, dataset, batches, collator, self.args.device, self._autocast_dtype)
            metrics = {f"{metric_key_prefix}_loss": loss, f"{metric_key_prefix}perplexity": perplexity(loss)}
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=metrics)
            self._meter.excluded_s += time.perf_counter() - started
            return metrics

        def _save_checkpoint(self, model, trial):
            started = time.perf_counter()
            if self.args.should_save:
                from runner.disk_space import checkpoint_bytes, ensure_free

                ensure_free(self.args.output_dir, checkpoint_bytes(model, self.args.output_dir),
                            f"checkpoint-{self.state.global_step}")
            super()._save_checkpoint(model, trial)  # args.save_total_limit is None: no rotation in there
            if self.args.should_save:
                folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
                ckpt.mark_complete(folder, self.state.global_step)
                best = self.state.best_global_step
                ckpt.rotate(self.args.output_dir, self._keep_checkpoints,
                            protect=f"checkpoint-{best}" if best else None)
            self._meter.excluded_s += time.perf_counter() - started

    return RunnerTrainer


def chunked_trainer_loss(trainer, model, inputs, packed, num_items_in_batch):
    """finetune.local.chunked_loss: the forward through the (wrapped) model with the head given zero
    tokens, then the loss over chunks (runner/local/loss.py), normalised and scaled exactly as
    Trainer.compute_loss does with the model's own loss."""
    from runner.local.loss import chunked_causal_lm_loss, head_input_capture, output_head

    inputs = dict(inputs)
    labels = inputs.pop("labels")
    head = output_head(trainer.accelerator.unwrap_model(model))
    with packed, head_input_capture(head) as captured:
        model(**inputs)  # through DDP/DeepSpeed wrappers, so their hooks see the forward
    scaled = trainer.model_accepts_loss_kwargs and num_items_in_batch is not None
    loss = chunked_causal_lm_loss(captured.hidden, head, labels,
                                  num_items_in_batch=num_items_in_batch if scaled else None)
    if trainer.args.average_tokens_across_devices and trainer.model_accepts_loss_kwargs \
            and num_items_in_batch is not None:
        loss_scale = trainer.accelerator.num_processes // trainer.get_tp_size()
        loss = loss * (loss_scale if trainer.args.n_gpu <= 1 else trainer.args.n_gpu)
    return loss


def make_callbacks(plan, events: Events, meter: TokenMeter, progress: bool):
    """(events and progress bar, best eval loss / early stopping, stop on a signal): the recipe's callbacks."""
    return _progress_callback(events, meter, progress), _early_stopping_callback(plan), _signal_callback()


def _progress_callback(events: Events, meter: TokenMeter, progress: bool):
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
                                                                                          perplexity(logs["eval_loss"]))}
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

    return EventsAndProgress()


def _early_stopping_callback(plan):
    from transformers import TrainerCallback

    class EarlyStoppingOnLoss(TrainerCallback):
        """Tracks the best eval loss; with apply_early_stopping, saves on improvement and stops after `patience`
        evaluations without an improvement larger than `threshold`."""

        def __init__(self):
            self.enabled = plan.early_stopping
            self.patience = plan.early_stopping_patience
            self.threshold = plan.early_stopping_threshold
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

    return EarlyStoppingOnLoss()


def _signal_callback():
    from transformers import TrainerCallback

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

    return StopOnSignal()


# ---- model ---------------------------------------------------------------------------------------------------

def load_model(model_dir, *, packing: bool, trust_remote_code: bool, ignore_mismatched_sizes: bool,
                dtype: str = "float32", packed_attention: str = "per_conversation"):
    import torch
    from transformers import AutoModelForCausalLM

    from runner.local.packing import register_packed_attention

    kwargs = dict(dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
                  ignore_mismatched_sizes=ignore_mismatched_sizes)
    if packing:
        try:
            return AutoModelForCausalLM.from_pretrained(model_dir,
                                                        attn_implementation=register_packed_attention(packed_attention),
                                                        **kwargs), True
        except (ValueError, ImportError) as exc:  # a model without SDPA support: pad instead
            print(f"packing off: {type(exc).__name__}: {exc}", flush=True)
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs), False


def apply_lora(model, lora: Dict[str, Any]):
    """PEFT LoRA with the plan's LoraConfig keywords (runner/local/translate.py)."""
    from peft import LoraConfig, get_peft_model

    from runner.quiet import quiet_lora

    quiet_lora()

    config = LoraConfig(**lora)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n})
        raise RunnerError(f"LoRA cannot be applied: {exc}. finetune.local.lora_target_modules="
                          f"{lora['target_modules']}; module names in this model: {names}") from None


def count_parameters(model) -> Dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": int(trainable), "total_params": int(total)}


def zero3_state_dict(trainer) -> Optional[Dict[str, Any]]:
    """Under DeepSpeed ZeRO-3 each rank holds only a shard of every weight (the module's own tensors are empty
    placeholders), so the final save needs the whole 16-bit weights gathered from all ranks; None otherwise."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None) if trainer.is_deepspeed_enabled else None
    if plugin is None or int(plugin.zero_stage or 0) != 3:
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


def save_final(model, tokenizer, out: Path, *, apply_lora: bool, merge_lora_weights: bool,
                state_dict=None) -> Dict[str, Any]:
    """A plain transformers model + tokenizer in out/final_model, written to a temp folder and renamed; with LoRA
    not merged by request, the adapter is kept in out/adapter too (the final model is still a merged copy, since
    only a plain model registers and serves faithfully)."""
    from runner.local.packing import PACKED_ATTENTIONS

    info: Dict[str, Any] = {"lora_merged": None, "adapter_dir": None}
    if apply_lora:
        if not merge_lora_weights:
            adapter_tmp = Path(tempfile.mkdtemp(prefix=".tmp-adapter-", dir=out))
            model.save_pretrained(adapter_tmp)
            tokenizer.save_pretrained(adapter_tmp)
            ckpt.replace_dir_atomically(adapter_tmp, out / "adapter")
            info["adapter_dir"] = str(out / "adapter")
            info["note"] = ("merge_lora_weights=false: the LoRA adapter is kept in adapter_dir; final_model_dir "
                            "holds a merged copy so the model can be registered and served as a plain model")
        info["lora_merged"] = merge_lora_weights
    if getattr(model.config, "_attn_implementation", None) in PACKED_ATTENTIONS.values():
        model.set_attn_implementation("sdpa")  # the saved model must load without this module
    from runner.disk_space import ensure_free, tensor_bytes

    ensure_free(out, tensor_bytes(model), "the final model's weights")
    # One merge-and-save for the fine-tune step and the export (runner/export/merged.py): merged weights,
    # tokenizer with the base's tokenizer.model, generation_config.json and chat template, renamed in when whole.
    from runner.export.merged import save_merged

    save_merged(model, tokenizer, out / "final_model", state_dict=state_dict)
    info["final_model_dir"] = str(out / "final_model")
    return info
