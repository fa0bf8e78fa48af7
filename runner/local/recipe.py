"""The local fine-tune as a recipe, in torchtune's shape: setup → train → save, and cleanup whatever happened.

`LocalRecipe` takes the plan from runner/local/translate.py (what every finetune key means here) and the run's
paths; the building blocks (the Trainer subclass, callbacks, evaluation, the model loader, the final save) are in
runner/local/trainer.py. `run_recipe()` drives the phases. A recipe runs in one process on one device: the torchrun
launch for several GPUs or DeepSpeed is decided and performed by its caller (runner/local/backend.py finetune(),
through runner/local/distributed.py), whose workers then each run this same recipe.
"""

import gc
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Optional

from runner.errors import RunnerError
from runner.local import checkpoints as ckpt
from runner.local import launch_plan, training_dir
from runner.local.translate import LocalTrainingPlan


def run_recipe(recipe) -> Dict[str, Any]:
    """setup → train → save, then cleanup (also after a failure or an interruption); returns save()'s result."""
    try:
        recipe.setup()
        recipe.train()
        return recipe.save()
    finally:
        recipe.cleanup()


class LocalRecipe:
    """One local fine-tune. setup(): seed, tokenizer, data, model (+ LoRA), batching, checkpoints to resume from,
    events, TrainingArguments and the Trainer (which builds the optimizer and scheduler). train(): the eval before
    training, the training loop with SIGTERM/SIGINT checkpointing, the final eval (or the best checkpoint). save():
    the final model, atomically, and the result. cleanup(): signal handlers and progress bars restored, memory
    freed."""

    def __init__(self, plan: LocalTrainingPlan, *, model_dir, train_file, eval_file, out_dir, device: str,
                 trust_remote_code: bool = False, log_fn=None, cache_dir=None, progress: bool = True):
        self.plan = plan
        self.model_dir = model_dir
        self.train_file = train_file
        self.eval_file = eval_file
        self.out = Path(out_dir)
        self.device = device
        self.trust_remote_code = trust_remote_code
        self.log_fn = log_fn
        self.cache_dir = cache_dir
        self.progress = progress
        self.started = time.time()
        self.is_main = int(os.environ.get("RANK", "0")) == 0
        self.trainer = None
        self.model = None
        self.signal_cb = None
        self.progress_cb = None
        self._bars_were_on: Optional[bool] = None
        self._locked_here = False
        self.figures: Dict[str, Any] = {}

    # ---- setup --------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from transformers import enable_full_determinism, set_seed

        from runner.heap import freeze_imported_objects
        from runner.local.packing import avoid_per_shape_attention_plans

        freeze_imported_objects()  # before the model and data exist: what is frozen is never collected
        plan = self.plan
        self.out.mkdir(parents=True, exist_ok=True)
        self._locked_here = training_dir.hold_for_training(self.out)  # never two live runs in one folder
        if self.device == "cuda":
            avoid_per_shape_attention_plans()
        (enable_full_determinism if plan.training_args["full_determinism"] else set_seed)(plan.seed)
        self._setup_data()
        self._setup_model()
        self._setup_batching()
        self._setup_checkpoints()
        self._setup_trainer()

    def _setup_data(self) -> None:
        """The tokenizer and the tokenized train/eval rows (cached beside the run)."""
        from transformers import AutoTokenizer

        from runner.data.prepare import tokenize_file_with_stats

        plan = self.plan
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=self.trust_remote_code)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        cache = Path(self.cache_dir) if self.cache_dir else self.out / "tokenized"
        show = self.progress and self.is_main
        train_ds, train_stats = tokenize_file_with_stats(self.train_file, tokenizer, plan.max_seq_length,
                                                         cache_dir=cache, progress=show)
        if plan.max_train_rows > 0:
            train_ds = train_ds.select(range(min(len(train_ds), plan.max_train_rows)))
        eval_ds = None
        if self.eval_file:
            eval_ds, _ = tokenize_file_with_stats(self.eval_file, tokenizer, plan.max_seq_length, cache_dir=cache,
                                                  progress=show)
            if plan.max_eval_rows > 0:
                eval_ds = eval_ds.select(range(min(len(eval_ds), plan.max_eval_rows)))
        if len(train_ds) == 0:
            raise RunnerError(f"{self.train_file}: no conversation with an assistant turn left to train on")
        self.tokenizer, self.train_ds, self.eval_ds, self.train_stats = tokenizer, train_ds, eval_ds, train_stats

    def _setup_model(self) -> None:
        """Gradient checkpointing decided ("auto" measured before the weights take memory), then the model (+ LoRA,
        + torch.compile)."""
        from runner.local import trainer as blocks
        from runner.local.speed import compile_refusal
        from runner.memory.estimate import base_weights_dtype

        plan = self.plan
        checkpointing = self._gradient_checkpointing()
        never_compiles = compile_refusal(plan.local, packing=plan.packing, checkpointing=checkpointing)
        if never_compiles:  # "auto" chose checkpointing: still refused before the model loads
            raise RunnerError(never_compiles)
        precision = blocks.mixed_precision(plan.precision, self.device)
        model, packing = blocks.load_model(self.model_dir, packing=plan.packing,
                                           trust_remote_code=self.trust_remote_code,
                                           ignore_mismatched_sizes=plan.ignore_mismatched_sizes,
                                           dtype=base_weights_dtype(plan.params, plan.local, precision),
                                           packed_attention=plan.local.get("packed_attention", "per_conversation"))
        model.config.use_cache = False
        if plan.apply_lora:
            model = blocks.apply_lora(model, plan.lora)
        if plan.local.get("compile"):
            from runner.local.speed import compile_decoder_layers

            compiled = compile_decoder_layers(model)
            if self.is_main:
                print(f"torch.compile: {compiled} decoder layers (the first steps compile them)", flush=True)
        self.model = model  # held from here on, so cleanup() frees it even when setup() fails later
        self.counts = blocks.count_parameters(model)
        self.gradient_checkpointing, self.precision, self.packing = checkpointing, precision, packing

    def _setup_batching(self) -> None:
        """Micro-batches by token budget (packed, or padded), the steps per epoch, the eval batches."""
        from runner.local.packing import PaddedCollator, TokenBudgetBatchSampler, pack_conversations
        from runner.local.trainer import steps_per_epoch

        plan, train_ds, eval_ds = self.plan, self.train_ds, self.eval_ds
        bs = plan.training_args["per_device_train_batch_size"]
        lengths = [len(x) for x in train_ds["input_ids"]]  # reading the column materialises it: once
        effective_len = self.train_stats["max_seq_length"] or max(lengths)
        max_tokens = plan.max_tokens_per_batch if self.packing else 0
        self.collator = pack_conversations if self.packing else PaddedCollator(
            self.tokenizer.pad_token_id, pad_to=effective_len if plan.pad_to_max_length else None)
        self.steps_per_epoch = steps_per_epoch(len(TokenBudgetBatchSampler(lengths, bs, max_tokens, plan.seed)),
                                               plan.training_args["gradient_accumulation_steps"])
        self.eval_batches = (TokenBudgetBatchSampler([len(x) for x in eval_ds["input_ids"]],
                                                     plan.training_args["per_device_eval_batch_size"], max_tokens,
                                                     shuffle=False).batches()
                             if eval_ds is not None and len(eval_ds) else [])
        self.lengths, self.max_tokens = lengths, max_tokens

    def _setup_checkpoints(self) -> None:
        """A fresh start or the newest intact checkpoint to resume from; the events file and the token meter."""
        from runner.local.trainer import Events, TokenMeter

        self.ckpt_dir = self.out / "checkpoints"
        self.resumed_from, self.removed, self.corrupt = None, [], []
        if self.plan.resume:
            self.removed = ckpt.remove_incomplete(self.ckpt_dir)
            latest, self.corrupt = ckpt.latest_intact(self.ckpt_dir)
            self.resumed_from = str(latest) if latest else None
        elif self.ckpt_dir.exists() and self.is_main:
            shutil.rmtree(self.ckpt_dir)
        for folder in self.removed:
            print(f"ignored incomplete checkpoint {folder}", flush=True)
        for warning in self.corrupt:
            print(f"warning: {warning}", flush=True)
        self.metrics_file = self.out / "metrics.jsonl"
        self.events = Events(self.metrics_file, self.log_fn, enabled=self.is_main,
                             append=self.resumed_from is not None)
        self.meter = TokenMeter()

    def _setup_trainer(self) -> None:
        """TrainingArguments, the Trainer (which builds the optimizer and scheduler) and its callbacks."""
        import torch
        from transformers import TrainingArguments
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        from runner.local.trainer import make_callbacks, make_trainer_class

        plan, precision, eval_ds = self.plan, self.precision, self.eval_ds
        eval_strategy, eval_steps = plan.eval_schedule(self.steps_per_epoch,
                                                       bool(eval_ds is not None and self.eval_batches))
        autocast_dtype = (torch.bfloat16 if precision["bf16"] else torch.float16) if any(precision.values()) else None
        args = TrainingArguments(**plan.training_arguments(
            output_dir=str(self.ckpt_dir), eval_strategy=eval_strategy, eval_steps=eval_steps,
            deepspeed=launch_plan.write_deepspeed_config(self.out, plan.params), use_cpu=self.device != "cuda",
            gradient_checkpointing=self.gradient_checkpointing, **precision))
        trainer = make_trainer_class()(model=self.model, args=args, train_dataset=self.train_ds,
                                       eval_dataset=eval_ds if eval_strategy != "no" else None,
                                       data_collator=self.collator, processing_class=self.tokenizer)
        self.trainer = trainer
        for noisy in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(noisy)
        progress_cb, best_cb, signal_cb = make_callbacks(plan, self.events, self.meter, self.progress and self.is_main)
        for cb in (progress_cb, best_cb, signal_cb):
            trainer.add_callback(cb)
        trainer.setup_runner(lengths=self.lengths, max_tokens=self.max_tokens, eval_dataset=eval_ds,
                             eval_batches=self.eval_batches, eval_collator=self.collator, meter=self.meter,
                             events=self.events, keep_checkpoints=plan.keep_checkpoints,
                             autocast_dtype=autocast_dtype, chunked_loss=bool(plan.local.get("chunked_loss", False)))
        self.args, self.autocast_dtype = args, autocast_dtype
        self.progress_cb, self.best_cb, self.signal_cb = progress_cb, best_cb, signal_cb

    # ---- train --------------------------------------------------------------------------------------------------
    def train(self) -> Dict[str, Any]:
        import torch
        from transformers.utils import logging as hf_logging

        from runner.local.trainer import TrainingInterrupted

        trainer, meter, signal_cb = self.trainer, self.meter, self.signal_cb
        eval_before = self._eval_before_training()

        # -- the loop: the Trainer's, with a checkpoint at the end of the step on SIGTERM/SIGINT --
        signal_cb.install()
        self._bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # "Writing model shards" at every checkpoint would break our bar
        out_of_memory = None
        try:
            if signal_cb.received:
                raise TrainingInterrupted(f"stopped by {signal_cb.received} before training started")
            meter.restart()  # the eval before training is not training time
            train_started, cpu_started = time.perf_counter(), time.process_time()
            try:
                output = trainer.train(resume_from_checkpoint=self.resumed_from)
            except torch.cuda.OutOfMemoryError as exc:  # torch.OutOfMemoryError: the same class
                out_of_memory = (str(exc).strip().splitlines() or ["out of memory"])[0]
            train_runtime, train_cpu = time.perf_counter() - train_started, time.process_time() - cpu_started
        finally:
            self._restore_signals_and_bars()
        if out_of_memory is not None:
            # outside the except block: the exception's traceback (and the frames holding the step's tensors) is
            # gone, so the memory can really be given back before the message is built
            raise self._out_of_memory(out_of_memory) from None
        step = trainer.state.global_step
        if signal_cb.received:
            latest = ckpt.latest_complete(self.ckpt_dir)
            raise TrainingInterrupted(
                f"stopped by {signal_cb.received} at step {step}; checkpoint {latest} saved. Run again with "
                f"finetune.resume_from_checkpoint=true to continue")

        last_eval, loaded_best = self._final_eval(step)
        self.figures = self._figures(output, step, eval_before, last_eval, loaded_best, train_runtime, train_cpu)
        return self.figures

    def _figures(self, output, step: int, eval_before, last_eval: Dict[str, Any], loaded_best,
                 train_runtime: float, train_cpu: float) -> Dict[str, Any]:
        trainer, meter, progress_cb, best_cb = self.trainer, self.meter, self.progress_cb, self.best_cb
        precision = self.precision
        return {
            "final_model_dir": None,
            "checkpoints_dir": str(self.ckpt_dir),
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
            "resumed_from": self.resumed_from,
            "ignored_incomplete_checkpoints": self.removed,
            "ignored_corrupt_checkpoints": self.corrupt,
            "metrics_file": str(self.metrics_file),
            "packing": self.packing,
            "steps_per_epoch": self.steps_per_epoch,
            "train_rows": len(self.train_ds),
            "eval_rows": len(self.eval_ds) if self.eval_ds is not None else 0,
            "truncated_rows": self.train_stats["truncated"],
            "dropped_rows": self.train_stats["dropped_no_assistant"],
            "tokenized_cache_hit": self.train_stats["cache_hit"],
            "precision": "bf16" if precision["bf16"] else ("fp16" if precision["fp16"] else "fp32"),
            "device": self.device,
            # measured, to set against the compute step's estimate (this process's GPU; every rank holds as much)
            "peak_gpu_memory_gb": self._peak_gpu_memory_gb(),
            "gradient_checkpointing": self.gradient_checkpointing,
            "ignored_params": dict(self.plan.ignored),
            **self.counts,
        }

    def _eval_before_training(self) -> Optional[float]:
        """The eval loss before training (kept from the first session when resuming), or None."""
        import torch

        from runner.local.trainer import evaluate_loss, perplexity

        device = self.args.device
        before_file = self.out / "eval_before.json"
        eval_before = None
        if self.resumed_from and before_file.exists():
            eval_before = json.loads(before_file.read_text()).get("eval_loss")
        elif self.eval_batches and self.plan.eval_before_training:
            out_of_memory: Optional[str] = None
            try:
                eval_before = evaluate_loss(self.model.to(device), self.eval_ds, self.eval_batches, self.collator,
                                            device, self.autocast_dtype)
            except torch.cuda.OutOfMemoryError as exc:
                out_of_memory = (str(exc).strip().splitlines() or ["out of memory"])[0]
            if out_of_memory is not None:
                raise self._out_of_memory(out_of_memory + " (in the eval before training: "
                                          "finetune.per_device_eval_batch_size sets its batch)") from None
            if self.is_main:
                ckpt.write_atomic(before_file, json.dumps({"eval_loss": eval_before}))
            self.events.emit("eval", {"eval_loss": eval_before, "perplexity": perplexity(eval_before)}, 0)
        return eval_before

    def _final_eval(self, step: int) -> tuple:
        """(the final eval figures, the best checkpoint loaded or None): the eval made at this very step, else
        measured now (on the best checkpoint when early stopping kept an earlier one)."""
        from runner.local.trainer import evaluate_loss, perplexity

        trainer, progress_cb, best_cb = self.trainer, self.progress_cb, self.best_cb
        last_eval = progress_cb.last_eval if progress_cb.last_eval_step == step else {}
        loaded_best = None
        if self.plan.early_stopping and best_cb.best_step not in (None, step):
            best_dir = self.ckpt_dir / f"checkpoint-{best_cb.best_step}"
            if ckpt.is_complete(best_dir):
                trainer._load_from_checkpoint(str(best_dir))
                loaded_best = str(best_dir)
                last_eval = {}
        if not last_eval and self.eval_batches:
            loss = evaluate_loss(trainer.model, self.eval_ds, self.eval_batches, self.collator, self.args.device,
                                 self.autocast_dtype)
            last_eval = {"eval_loss": loss, "perplexity": perplexity(loss)}
            if loaded_best is None:
                self.events.emit("eval", last_eval, step)
        return last_eval, loaded_best

    # ---- save ---------------------------------------------------------------------------------------------------
    def save(self) -> Dict[str, Any]:
        """The final model (LoRA merged) written atomically by rank 0, the summary event and result.json."""
        from runner.local.trainer import save_final, zero3_state_dict

        result = dict(self.figures)
        gathered = zero3_state_dict(self.trainer)  # a collective: every rank takes part, rank 0 gets the weights
        if self.is_main:
            result.update(save_final(self.trainer.model, self.tokenizer, self.out, apply_lora=self.plan.apply_lora,
                                      merge_lora_weights=self.plan.merge_lora_weights, state_dict=gathered))
            result["wall_time_s"] = time.time() - self.started
            self.events.emit("summary", {k: v for k, v in result.items() if isinstance(v, (int, float))},
                             result["global_step"])
            ckpt.write_atomic(self.out / launch_plan.RESULT_FILE, json.dumps(result, indent=1, default=str))
        return result

    # ---- cleanup ------------------------------------------------------------------------------------------------
    def cleanup(self) -> None:
        """Runs after save() and after a failure alike; never raises over the failure it follows."""
        self._restore_signals_and_bars()
        if self.progress_cb is not None and getattr(self.progress_cb, "bar", None) is not None:
            self.progress_cb.bar.close()  # on_train_end did not run when the loop failed
        if self.trainer is not None:
            try:
                self.trainer.accelerator.free_memory()  # the prepared model/optimizer/scheduler/dataloader refs
            except Exception as exc:  # noqa: BLE001 - cleanup must not hide what happened before it
                print(f"cleanup: freeing the trainer's memory failed: {type(exc).__name__}: {exc}", flush=True)
        for name in ("trainer", "model", "tokenizer", "train_ds", "eval_ds", "collator", "args"):
            setattr(self, name, None)
        self._give_back_memory("cleanup")
        if self._locked_here:
            training_dir.release(self.out)

    def _give_back_memory(self, when: str) -> None:
        """Collect what nothing refers to any more and hand the CUDA allocator's cache back; never raises over
        the failure that led here."""
        gc.collect()
        if self.device == "cuda":
            try:
                import torch

                torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001
                print(f"{when}: emptying the CUDA cache failed: {type(exc).__name__}: {exc}", flush=True)

    # ---- out of memory ------------------------------------------------------------------------------------------
    def _out_of_memory(self, what: str) -> RunnerError:
        """An OOM in the training loop (a forward, backward, optimizer step or checkpoint save ran out of device
        memory): the memory is given back, the checkpoints are left as resumable (a checkpoint the OOM cut short
        has no COMPLETE.json manifest and is removed; the newest complete one is untouched), and the error names the
        micro-batch that was run, what the memory estimate says fits, the keys that change it and how to resume."""
        trainer, plan = self.trainer, self.plan
        step = int(trainer.state.global_step) if trainer is not None else 0
        max_steps = int(getattr(trainer.state, "max_steps", 0) or 0) if trainer is not None else 0
        peak = self._peak_gpu_memory_gb()
        self._free_after_oom()

        latest = None
        if self.is_main:
            for name in ckpt.remove_incomplete(self.ckpt_dir):
                print(f"out of memory: removed incomplete checkpoint {name}", flush=True)
        latest = ckpt.latest_complete(self.ckpt_dir)

        ta = plan.training_args
        bs, accum = int(ta["per_device_train_batch_size"]), int(ta["gradient_accumulation_steps"])
        seq = int(self.train_stats.get("max_seq_length") or plan.max_seq_length) if self.train_stats else \
            plan.max_seq_length
        cap = plan.max_tokens_per_batch if self.packing else 0
        shape = (f"per_device_train_batch_size={bs} x max_seq_length={seq}"
                 + (f" capped at max_tokens_per_batch={cap}" if cap else "")
                 + f", gradient_accumulation_steps={accum}, gradient checkpointing "
                 + ("on" if self.gradient_checkpointing else "off")
                 + (", packed" if self.packing else ", padded"))
        where = f"{self.device}" + (f", peak allocated {peak:.1f} GB" if peak is not None else "")
        head = (f"out of memory during training at step {step}" + (f" of {max_steps}" if max_steps else "")
                + f" ({where}): {what}. Micro-batch run: {shape}.")
        knobs = ("Keys that lower the peak: finetune.per_device_train_batch_size with "
                 "finetune.gradient_accumulation_steps (keep their product to keep the effective batch), "
                 "finetune.local.gradient_checkpointing=true, finetune.local.auto_fit=true (runs the estimate's "
                 "largest fitting micro-batch), finetune.local.max_tokens_per_batch (packing: a token cap per "
                 "micro-batch), finetune.max_seq_length.")
        if latest is not None:
            resume = (f"Checkpoint {latest} (step {ckpt.checkpoint_step(latest)}) is complete: run again with "
                      f"finetune.resume_from_checkpoint=true (and the changed keys) to continue from it.")
        else:
            resume = ("No checkpoint was complete before the OOM (finetune.local.save_steps sets how often one is "
                      "written): a rerun starts from step 0; finetune.resume_from_checkpoint=true resumes once one "
                      "exists.")
        return RunnerError(" ".join([head, self._oom_estimate(), knobs, resume]))

    def _free_after_oom(self) -> None:
        """Give back what the failed step held: gradients, the optimizer's references stay (resuming rebuilds
        them), the allocator's cache."""
        trainer = self.trainer
        try:
            if trainer is not None:
                if getattr(trainer, "optimizer", None) is not None:
                    trainer.optimizer.zero_grad(set_to_none=True)
                trainer.model.zero_grad(set_to_none=True)
        except Exception as exc:  # noqa: BLE001 - the OOM is what the user must see
            print(f"out of memory: dropping the gradients failed: {type(exc).__name__}: {exc}", flush=True)
        self._give_back_memory("out of memory")

    def _oom_estimate(self) -> str:
        """What the memory estimate (runner/local/compute.memory_plan) says for this run against this device:
        the configured micro-batch's estimated peak and the largest micro-batch that fits without and with
        gradient checkpointing (each with the accumulation that keeps the effective batch)."""
        from runner.local.compute import memory_plan

        plan = self.plan
        try:
            gpu_gb = 0.0
            if self.device == "cuda":
                import torch

                gpu_gb = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 1024 ** 3
            est = memory_plan(str(self.model_dir), plan.params, plan.local, device=self.device, gpus=1,
                              gpu_memory_gb=gpu_gb)
        except Exception as exc:  # noqa: BLE001 - the OOM is what the user must see
            return f"(The memory estimate could not be computed: {type(exc).__name__}: {exc}.)"
        fit = est.get("fit")
        if not fit:
            return f"The memory estimate for this micro-batch: ~{est['total_gb']:.1f} GB without checkpointing."

        def option(opt):
            if not opt:
                return "nothing fits"
            return (f"per_device_train_batch_size={opt['per_device_train_batch_size']} with "
                    f"gradient_accumulation_steps={opt['gradient_accumulation_steps']} (~{opt['total_gb']:.1f} GB)")

        return (f"The memory estimate for this micro-batch: ~{fit['total_gb_without_checkpointing']:.1f} GB without "
                f"gradient checkpointing, ~{fit['total_gb_with_checkpointing']:.1f} GB with it, against "
                f"{fit['budget_gb']:.1f} GB usable ({est['target']}); largest that fits without checkpointing: "
                f"{option(fit['largest_without_checkpointing'])}; with checkpointing: "
                f"{option(fit['largest_with_checkpointing'])}."
                + (" The estimate says the micro-batch run fits, so memory it does not count ran out (other "
                   "processes on the device, allocator fragmentation, a longer batch than the worst case it "
                   "assumes): lower the micro-batch below what it suggests." if est.get("fits") else ""))

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _gradient_checkpointing(self) -> bool:
        """finetune.local.gradient_checkpointing: true/false as set (the local backend passes the compute step's
        decision); "auto" (train() called without that step) by the compute step's rule against this device's free
        memory now."""
        setting = self.plan.gradient_checkpointing
        if setting != "auto":
            return bool(setting)
        from runner.local.compute import gradient_checkpointing_for, system_memory_available

        if self.device == "cuda":
            import torch

            available = torch.cuda.mem_get_info()[0]
        else:
            available = system_memory_available()
        return gradient_checkpointing_for(str(self.model_dir), self.plan.params, self.plan.local,
                                          available_bytes=available)

    def _restore_signals_and_bars(self) -> None:
        if self.signal_cb is not None:
            self.signal_cb.restore()  # idempotent
        if self._bars_were_on:
            from transformers.utils import logging as hf_logging

            hf_logging.enable_progress_bar()
        self._bars_were_on = None

    def _peak_gpu_memory_gb(self) -> Optional[float]:
        if self.device != "cuda":
            return None
        import torch

        return torch.cuda.max_memory_allocated() / 1e9
