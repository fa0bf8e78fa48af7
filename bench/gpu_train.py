"""Full-size GPU fine-tuning, side by side: the runner's trainer against TRL's SFTTrainer, on the same model and data.

    pip install -e .[bench]        (TRL; liger-kernel too for the last contender: pip install liger-kernel)
    python bench/gpu_train.py [--mode lora|full] [--micro-batch 4] [--max-seq-length 2048] [--steps 30]
                              [--warmup-steps 5] [--checkpointing off|on|auto] [--contenders runner,trl,...]
    python bench/gpu_train.py --smoke     (CPU: the same harness on a tiny Phi-3 shape, a handful of steps)

What is compared (each contender in its own Python process, so one's allocations, compiled kernels and
fragmentation never reach the next; the table is printed by the parent):
  runner              runner.local.train.train(): packed padding-free batches, packed SDPA, bf16 autocast;
                      gradient checkpointing as --checkpointing says ("auto": the memory estimate's rule)
  runner-<levers>     the same with speed levers on, any of (joined with "-", e.g. runner-varlen-compile):
                        chunked  finetune.local.chunked_loss=true (runner/local/loss.py: no full fp32 logits)
                        varlen   finetune.local.packed_attention=varlen (one flash varlen kernel per layer)
                        compile  finetune.local.compile=true (torch.compile of every decoder layer)
  trl                 TRL SFTTrainer as it comes: padded batches, its default gradient checkpointing (on)
  trl-packing         SFTTrainer with packing=True (its default "bfd" strategy, padding-free rows)
  trl-packing-liger   SFTTrainer with packing=True, use_liger_kernel=True and gradient checkpointing on
                      (skipped with a message when liger-kernel is not installed)
All of them: the same model folder (loaded in the same dtype the runner loads it in: a bf16 frozen base under
LoRA, fp32 weights + bf16 autocast for full fine-tuning), the same LoRA settings (the schema's defaults), the same
micro-batch, max length, learning rate and number of optimizer steps, assistant-only loss, no evaluation, no
checkpoints. TRL's max_length is set to --max-seq-length (its own default is 1024).

The model: Phi-3-mini-4k-instruct's published shape (runner/memory/terms.KNOWN_CONFIGS, 3.8B parameters), random
init (seeded) in bf16 on the GPU, saved once to a work folder: nothing comes from the hub. Its tokenizer is the
project's offline byte-level BPE (runner/local/tiny_model.py, ~2k ids; the model keeps its 32,064-row embedding and
head, so the compute per token is the real model's).

The data: synthetic conversations shaped like ultrachat_200k train_sft: 1-4 user/assistant turns, total length
drawn from a log-normal with mean ~1,130 and p90 ~2,038 tokens (sigma 0.601, mu 6.849), the same rows (seeded) for
every contender. The table's header prints the lengths actually measured with the tokenizer.

What is printed per contender:
  tok/s        non-padding tokens trained on per second, measured over the steps after --warmup-steps (each
               micro-batch is time-stamped after a CUDA synchronize as it starts; the last one's tokens are not
               counted, its time is not either)
  padding      padding tokens / all tokens of the batches
  peak GB      torch.cuda.max_memory_allocated() of the worker / 1e9 (decimal GB, the estimate's unit; the
               allocator's peak: the CUDA context and cached-but-free blocks are not in it)
  est GB       runner.local.compute.memory_plan for that contender's settings (packed or padded worst case,
               checkpointing or not); peak/est is the ratio. A runner row whose estimate is more than 5% below
               the peak or more than 25% above it is marked, and the script exits 1 (the estimate's trust bound)
  x baseline   tok/s over the baseline contender's (--baseline, default trl-packing; run in the same invocation)
  MFU          6 * N * tok/s / the GPU's dense bf16 peak (989 TFLOP/s for an H100 SXM; --peak-tflops for another
               card). N = all parameters; the 6N rule counts neither attention's quadratic FLOPs nor the
               recomputation under checkpointing, and a LoRA backward skips the frozen weights' gradients (~4N), so
               under LoRA this MFU overstates the work done: compare contenders with it, not against papers.
After the table (on CUDA) it prints each speed target of issue 12 as met / NOT met / n/a, from this run's rows
only: the best runner row without checkpointing >= 1.5x trl-packing; the best runner row with checkpointing and a
peak <= 22 GB >= 1.3x trl-packing-liger; MFU >= 35% at LoRA 4 x 2048 without checkpointing. `--checkpointing both`
runs every contender that the flag changes twice (off, then on), so one invocation has the rows for all three:

    python bench/gpu_train.py --checkpointing both

Without CUDA (and without --smoke) it says so and exits 2. No figure of this script is committed anywhere: run it.
"""

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# finetune.local settings of each lever a runner contender can name (runner-varlen-compile: both)
RUNNER_LEVERS = {"chunked": {"chunked_loss": True}, "varlen": {"packed_attention": "varlen"},
                 "compile": {"compile": True}}
TRL_CONTENDERS = ("trl", "trl-packing", "trl-packing-liger")
# trl: SFTConfig's default (on); trl-packing-liger: on by definition. --checkpointing does not change them
FIXED_CHECKPOINTING = ("trl", "trl-packing-liger")
CONTENDERS = ("runner", "runner-chunked", "runner-varlen", "runner-compile", "runner-varlen-compile-chunked",
              *TRL_CONTENDERS)
LOGNORMAL_MU, LOGNORMAL_SIGMA = 6.849, 0.601  # mean exp(mu + sigma^2/2) ~ 1,130; p90 exp(mu + 1.2816 sigma) ~ 2,038
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense bf16
RESULT = "RESULT "


# ---- the data --------------------------------------------------------------------------------------------------

def _word_pieces(tokenizer):
    """Vocabulary entries that decode to ' word' (one token each, mostly): the text the conversations are made of."""
    pieces = []
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if token.startswith("\u0120") and token[1:].isalpha() and len(token) > 2:
            pieces.append(token[1:])
    return pieces or ["token"]


def synthetic_rows(tokenizer, n: int, max_len: int, seed: int = 0):
    """n conversations (ultrachat_200k's schema: prompt, prompt_id, messages) whose templated lengths follow the
    log-normal above, capped at max_len."""
    rng = random.Random(seed)
    words = _word_pieces(tokenizer)
    rows = []
    for i in range(n):
        target = int(min(max_len, max(48, rng.lognormvariate(LOGNORMAL_MU, LOGNORMAL_SIGMA))))
        turns = rng.randint(1, 4)
        budget = max(8 * turns, int(0.975 * target) - 8 * turns)  # ~4 template tokens per message
        # assistant replies carry most of the text (as in ultrachat): user 1 share, assistant 3 shares
        shares = [rng.uniform(0.5, 1.5) * (1 if j % 2 == 0 else 3) for j in range(2 * turns)]
        total = sum(shares)
        messages = []
        for j, share in enumerate(shares):
            count = max(2, int(budget * share / total))
            messages.append({"role": "user" if j % 2 == 0 else "assistant",
                             "content": " ".join(rng.choice(words) for _ in range(count))})
        rows.append({"prompt": messages[0]["content"], "prompt_id": f"synthetic-{seed}-{i}", "messages": messages})
    return rows


def length_stats(tokenizer, rows):
    lengths = sorted(len(tokenizer(tokenizer.apply_chat_template(r["messages"], tokenize=False),
                                   add_special_tokens=False)["input_ids"]) for r in rows)
    return {"rows": len(lengths), "mean": sum(lengths) / len(lengths), "p50": lengths[len(lengths) // 2],
            "p90": lengths[int(0.9 * (len(lengths) - 1))], "max": lengths[-1]}


# ---- the model -------------------------------------------------------------------------------------------------

def build_model(out_dir: Path, smoke: bool) -> Path:
    """Smoke: the project's tiny Phi-3. Else: Phi-3-mini's shape, random init in bf16 on the GPU, saved."""
    from runner.local.tiny_model import build_tiny_model

    if smoke:
        return build_tiny_model(out_dir, max_position_embeddings=4096)
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    from runner.memory.terms import KNOWN_CONFIGS
    from runner.local.tiny_model import _default_corpus, train_tokenizer

    tokenizer = train_tokenizer(_default_corpus(0), 2048, 4096)
    shape = dict(KNOWN_CONFIGS["Phi-3-mini-4k-instruct"])
    shape.pop("model_type")
    config = Phi3Config(
        **shape, original_max_position_embeddings=shape["max_position_embeddings"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Phi3ForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    del model
    torch.cuda.empty_cache()
    return out_dir


# ---- the workers -----------------------------------------------------------------------------------------------

class _Stamps:
    """(time, real tokens so far, all tokens so far) as each micro-batch starts, after a CUDA synchronize."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.real = 0
        self.total = 0
        self.marks = []

    def add(self, real: int, total: int) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), self.real, self.total))
        self.real += real
        self.total += total

    def steady_rate(self, skip: int) -> float:
        marks = self.marks[skip:] if len(self.marks) > skip + 1 else self.marks
        if len(marks) < 2:
            return float("nan")
        (t0, r0, _), (t1, r1, _) = marks[0], marks[-1]
        return (r1 - r0) / (t1 - t0) if t1 > t0 else float("nan")

    def padding(self) -> float:
        return 1.0 - self.real / self.total if self.total else 0.0


def runner_levers(contender: str) -> dict:
    """finetune.local overrides of a runner contender's name ("runner-varlen-compile"); ValueError if unknown."""
    if contender != "runner" and not contender.startswith("runner-"):
        raise ValueError(f"{contender!r} is not a runner contender")
    settings = {}
    for lever in contender.split("-")[1:]:
        if lever not in RUNNER_LEVERS:
            raise ValueError(f"{contender!r}: unknown lever {lever!r} (levers: {', '.join(RUNNER_LEVERS)})")
        settings.update(RUNNER_LEVERS[lever])
    return settings


def known_contender(name: str) -> bool:
    if name in TRL_CONTENDERS:
        return True
    try:
        runner_levers(name)
    except ValueError:
        return False
    return True


def _settings(spec, contender):
    """The runner's (params, local) for this spec; TRL contenders use the same numbers."""
    import dataclasses

    from runner.schema import RUNNER_FINETUNE_KEYS, FinetuneConfig, LocalFinetuneConfig

    def defaults(cls):  # the runner's own keys (local, route, attach_job) are no trainer parameters
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls) if f.name not in RUNNER_FINETUNE_KEYS}

    params, local = defaults(FinetuneConfig), defaults(LocalFinetuneConfig)
    params.update(max_steps=spec["steps"], per_device_train_batch_size=spec["micro_batch"],
                  learning_rate=spec["lr"], max_seq_length=spec["max_seq_length"], evaluation_strategy="disable",
                  logging_steps=1, seed=0, precision=16 if spec["cuda"] else 32, apply_lora=spec["mode"] == "lora")
    checkpointing = {"off": False, "on": True, "auto": "auto"}[spec["checkpointing"]]
    if contender in FIXED_CHECKPOINTING:
        checkpointing = True
    local.update(packing=contender != "trl", eval_before_training=False, save_steps=10 ** 6,
                 gradient_checkpointing=checkpointing)
    if contender.startswith("runner"):
        local.update(runner_levers(contender))
    return params, local


def _estimate(spec, contender):
    from runner.local.compute import memory_plan

    params, local = _settings(spec, contender)
    if not spec["cuda"]:
        return None, None
    est = memory_plan(spec["model_dir"], params, local, device="cuda", gpus=1)
    # memory_plan reads finetune.local.chunked_loss itself: the head's terms for one chunk of logits
    ckpt = local["gradient_checkpointing"]
    if ckpt == "auto":
        import torch

        from runner.memory.terms import use_gradient_checkpointing

        ckpt = use_gradient_checkpointing("auto", est["bytes"]["total"], torch.cuda.mem_get_info()[0] * 0.9)
    return (est["total_gb_with_checkpointing"] if ckpt else est["total_gb"]), bool(ckpt)


def run_runner(spec, work: Path, contender: str = "runner"):
    import torch

    from runner.local import train as train_mod
    from runner.local import trainer as trainer_mod

    stamps = _Stamps(spec["cuda"])
    base_meter = trainer_mod.TokenMeter

    class StampingMeter(base_meter):
        def add(self, real, total):
            stamps.add(real, total)
            super().add(real, total)

    trainer_mod.TokenMeter = StampingMeter
    params, local = _settings(spec, contender)
    result = train_mod.train(model_dir=spec["model_dir"], train_file=spec["train_file"], eval_file=None,
                             params=params, local=local, out_dir=str(work), device="cuda" if spec["cuda"] else "cpu",
                             progress=False)
    return {"steps": result["global_step"], "stamps": stamps, "loss": result["train_loss"],
            "gradient_checkpointing": result["gradient_checkpointing"], "packing": result["packing"],
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if spec["cuda"] else None,
            "params": result["total_params"]}


def run_trl(spec, work: Path, contender: str):
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_probes import count_batches, last_loss
    from trl import SFTConfig, SFTTrainer

    from runner.memory.estimate import base_weights_dtype

    params, local = _settings(spec, contender)
    precision = {"bf16": spec["cuda"], "fp16": False}
    dtype = getattr(torch, base_weights_dtype(params, local, precision))
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype)
    rows = [json.loads(line) for line in Path(spec["train_file"]).read_text().splitlines()]
    dataset = datasets.Dataset.from_list([{"messages": r["messages"]} for r in rows])
    extra = {}
    if contender in ("trl-packing", "trl-packing-liger"):
        extra["packing"] = True
    if contender == "trl-packing-liger":
        extra["use_liger_kernel"] = True
    if contender != "trl":
        extra["gradient_checkpointing"] = bool(local["gradient_checkpointing"] is True or (
            local["gradient_checkpointing"] == "auto" and _estimate(spec, contender)[1]))
    config = SFTConfig(output_dir=str(work), max_steps=spec["steps"], per_device_train_batch_size=spec["micro_batch"],
                       learning_rate=spec["lr"], max_length=spec["max_seq_length"], assistant_only_loss=True,
                       use_cpu=not spec["cuda"], bf16=spec["cuda"], report_to="none", save_strategy="no",
                       logging_steps=1, disable_tqdm=True, seed=0, **extra)
    peft_config = None
    if params["apply_lora"]:
        peft_config = LoraConfig(r=int(params["lora_r"]), lora_alpha=int(params["lora_alpha"]),
                                 lora_dropout=float(params["lora_dropout"]),
                                 target_modules=list(local["lora_target_modules"]), task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)
    stamps = _Stamps(spec["cuda"])
    count_batches(trainer, stamps.add)
    losses = last_loss(trainer)
    trainer.train()
    return {"steps": trainer.state.global_step, "stamps": stamps, "loss": losses.loss,
            "gradient_checkpointing": bool(config.gradient_checkpointing), "packing": bool(config.packing),
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if spec["cuda"] else None,
            "params": sum(p.numel() for p in trainer.model.parameters())}


def worker(contender: str, spec_file: str) -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    spec = json.loads(Path(spec_file).read_text())
    work = Path(spec["work"]) / contender
    if spec["cuda"]:
        import torch

        torch.cuda.reset_peak_memory_stats()
    out = run_runner(spec, work, contender) if contender.startswith("runner") else run_trl(spec, work, contender)
    estimate, _ = _estimate(spec, contender)
    stamps = out.pop("stamps")
    rate = stamps.steady_rate(spec["warmup_steps"])
    flops = 6.0 * out["params"] * rate
    print(RESULT + json.dumps({
        **out, "contender": contender, "tokens_per_s": rate, "padding": stamps.padding(),
        "real_tokens": stamps.real, "estimate_gb": estimate,
        "mfu": flops / (spec["peak_tflops"] * 1e12) if spec["peak_tflops"] else None,
    }), flush=True)


# ---- the parent ------------------------------------------------------------------------------------------------

def estimate_outside_bound(r) -> bool:
    """A runner row whose estimate breaks the trust bound (runner.memory.terms.ratio_bounds_ok: never more than 5%
    below the measured peak, at most 25% above). TRL rows are not held to it: the estimate is the runner's."""
    from runner.memory.terms import ratio_bounds_ok

    if r.get("failed") or not r["contender"].startswith("runner") or not (r["peak_gb"] and r["estimate_gb"]):
        return False
    return not ratio_bounds_ok(r["estimate_gb"], r["peak_gb"])


def jobs(contenders, modes):
    """(contender, checkpointing mode) pairs to run, in order: every contender in the first mode, then those that
    --checkpointing changes in the next; a runner contender that would compile nothing under checkpointing is
    skipped (saying why) in mode "on"."""
    from runner.local.speed import compile_refusal

    out = []
    for i, mode in enumerate(modes):
        for name in contenders:
            if i and name in FIXED_CHECKPOINTING:
                continue
            if name.startswith("runner") and mode == "on":
                why = compile_refusal(runner_levers(name), packing=True, checkpointing=True)
                if why:
                    print(f"skipping {name} with checkpointing on: {why}", flush=True)
                    continue
            out.append((name, mode))
    return out


# the issue's speed targets (issue 12): (runner rows, baseline, at least this ratio, peak GB at most)
SPEED_TARGETS = (
    ("without checkpointing: the best runner row vs trl-packing", False, "trl-packing", 1.5, None),
    ("with checkpointing: the best runner row vs trl-packing-liger, at a peak <= 22 GB", True, "trl-packing-liger",
     1.3, 22.0),
)
MFU_TARGET = 0.35  # LoRA, 4 conversations x 2048, no checkpointing, on an H100


def target_lines(results, *, micro_batch: int, max_seq_length: int, mode: str) -> list:
    """One line per target of issue 12: met, NOT met, or which row it lacks. Only rows of this invocation."""
    ok = [r for r in results if not r.get("failed") and r.get("tokens_per_s")]
    lines = []
    for what, checkpointing, baseline, ratio, peak_cap in SPEED_TARGETS:
        base = next((r for r in ok if r["contender"] == baseline), None)
        runners = [r for r in ok if r["contender"].startswith("runner")
                   and bool(r["gradient_checkpointing"]) == checkpointing
                   and (peak_cap is None or (r["peak_gb"] is not None and r["peak_gb"] <= peak_cap))]
        if base is None or not runners:
            missing = (f"{baseline} row" if base is None else
                       f"runner row with checkpointing {'on' if checkpointing else 'off'}"
                       + (f" at a peak <= {peak_cap:g} GB" if peak_cap else ""))
            lines.append(f"target {what} >= {ratio}x: n/a (this run has no {missing})")
            continue
        best = max(runners, key=lambda r: r["tokens_per_s"])
        got = best["tokens_per_s"] / base["tokens_per_s"]
        lines.append(f"target {what} >= {ratio}x: {got:.2f}x ({best['contender']}, "
                     f"{best['tokens_per_s']:.0f} vs {base['tokens_per_s']:.0f} tok/s) "
                     f"{'met' if got >= ratio else 'NOT met'}")
    shape_ok = mode == "lora" and micro_batch == 4 and max_seq_length == 2048
    mfus = [r for r in ok if r["contender"].startswith("runner") and not r["gradient_checkpointing"]
            and r.get("mfu") is not None]
    if not shape_ok or not mfus:
        lines.append(f"target MFU(6N) >= {MFU_TARGET:.0%} at LoRA 4 x 2048 without checkpointing: n/a (this run is "
                     f"{mode} {micro_batch} x {max_seq_length}{'' if mfus else ', no runner row without it'})")
    else:
        best = max(mfus, key=lambda r: r["mfu"])
        lines.append(f"target MFU(6N) >= {MFU_TARGET:.0%} at LoRA 4 x 2048 without checkpointing: {best['mfu']:.1%} "
                     f"({best['contender']}) {'met' if best['mfu'] >= MFU_TARGET else 'NOT met'}")
    return lines


def print_table(results, baseline: str) -> None:
    """One row per contender run; 'x baseline' divides by the named baseline's tok/s from the same invocation,
    with the same checkpointing where the baseline ran both ways."""
    def base_for(r):
        named = [b for b in results if b["contender"] == baseline and not b.get("failed")]
        same = [b for b in named if b["gradient_checkpointing"] == r.get("gradient_checkpointing")]
        return (same or named or [None])[0]

    width = max([len("contender")] + [len(r["contender"]) for r in results])
    print(f"{'contender':{width}s} {'tok/s':>9s} {'x ' + baseline:>{max(10, len(baseline) + 2)}s} {'padding':>8s} "
          f"{'peak GB':>8s} {'est GB':>7s} {'peak/est':>8s} {'MFU':>6s} {'ckpt':>5s} {'steps':>5s} {'loss':>7s}")
    for r in results:
        if r.get("failed"):
            print(f"{r['contender']:{width}s} {'failed':>9s}")
            continue
        ratio = r["peak_gb"] / r["estimate_gb"] if r["peak_gb"] and r["estimate_gb"] else None
        own_base = base_for(r)
        speedup = r["tokens_per_s"] / own_base["tokens_per_s"] if own_base and r["tokens_per_s"] else None
        print(f"{r['contender']:{width}s} {_fmt(r['tokens_per_s'], '9.0f')} "
              f"{_fmt(speedup, '.2f') + 'x' if speedup else 'n/a':>{max(10, len(baseline) + 2)}s} "
              f"{r['padding']:8.1%} {_fmt(r['peak_gb'], '8.1f'):>8s} {_fmt(r['estimate_gb'], '7.1f'):>7s} "
              f"{_fmt(ratio, '8.2f'):>8s} {_fmt(r['mfu'], '6.1%'):>6s} "
              f"{'on' if r['gradient_checkpointing'] else 'off':>5s} {r['steps']:5d} {_fmt(r['loss'], '7.3f'):>7s}"
              + ("  estimate OUTSIDE the bound" if estimate_outside_bound(r) else ""))
    if not any(r["contender"] == baseline and not r.get("failed") for r in results):
        print(f"(no 'x {baseline}' figures: the baseline {baseline} did not run in this invocation)")


def _peak_tflops(arg):
    if arg:
        return arg
    import torch

    name = torch.cuda.get_device_name(0)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def _fmt(value, spec):
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny Phi-3 shape, a handful of steps")
    parser.add_argument("--contenders", default=None,
                        help=f"comma-separated, of {','.join(CONTENDERS)} (default: all; --smoke: runner,trl)")
    parser.add_argument("--mode", choices=("lora", "full"), default="lora")
    parser.add_argument("--micro-batch", type=int, default=None, help="per-device micro-batch (default 4; smoke 2)")
    parser.add_argument("--max-seq-length", type=int, default=None, help="default 2048; smoke 256")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 30; smoke 4)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="steps left out of tok/s (default 5; smoke 1)")
    parser.add_argument("--checkpointing", choices=("off", "on", "auto", "both"), default="off",
                        help="gradient checkpointing for runner and trl-packing; both: every such contender off, "
                             "then on, in one table (trl keeps its default, on; "
                             "trl-packing-liger: on)")
    parser.add_argument("--baseline", default="trl-packing",
                        help="the contender the 'x baseline' column divides by (default trl-packing)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rows", type=int, default=None, help="synthetic conversations (default: enough rows)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak (default: 989 for H100/H200, 312 for A100, ...)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per contender")
    parser.add_argument("--work", default=None, help="work folder (default: a new temp folder)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.spec)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("bench/gpu_train.py measures full-size fine-tuning on a CUDA GPU, and no CUDA device is visible here "
              "(torch.cuda.is_available() is False). Run it on a GPU machine, or --smoke for the harness on the CPU.",
              file=sys.stderr)
        return 2
    if args.smoke:
        cuda = False
    micro = args.micro_batch or (2 if args.smoke else 4)
    max_len = args.max_seq_length or (256 if args.smoke else 2048)
    steps = args.steps or (4 if args.smoke else 30)
    warmup = args.warmup_steps if args.warmup_steps is not None else (1 if args.smoke else 5)
    wanted = [c.strip() for c in (args.contenders or ("runner,trl" if args.smoke else ",".join(CONTENDERS))).split(",")
              if c.strip()]
    unknown = [c for c in wanted if not known_contender(c)]
    if unknown:
        parser.error(f"unknown contender(s) {unknown}; choose from {', '.join(CONTENDERS)} (or runner- with any "
                     f"of the levers {', '.join(RUNNER_LEVERS)} joined by -)")
    skipped = {}
    for c in wanted:
        if c.startswith("runner") and "varlen" in c.split("-") and args.smoke:
            skipped[c] = "packed_attention=varlen is a CUDA kernel: GPU only"
    try:
        import trl  # noqa: F401
    except ImportError:
        for c in wanted:
            if c.startswith("trl"):
                skipped[c] = "TRL is not installed (pip install -e .[bench])"
    if "trl-packing-liger" in wanted and "trl-packing-liger" not in skipped:
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            skipped["trl-packing-liger"] = "liger-kernel is not installed (pip install liger-kernel)"
        if args.smoke:
            skipped["trl-packing-liger"] = "Liger's kernels are Triton: GPU only"
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", flush=True)
    run = [c for c in wanted if c not in skipped]

    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gpu_train."))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_dir = build_model(work / ("tiny-phi3" if args.smoke else "phi3-mini-random"), args.smoke)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    n_rows = args.rows or max(64, micro * (steps + 2) * 2)
    rows = synthetic_rows(tokenizer, n_rows, max_len=4000, seed=0)
    train_file = work / "train_sft.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    stats = length_stats(tokenizer, rows)
    spec = {"model_dir": str(model_dir), "train_file": str(train_file), "work": str(work), "cuda": cuda,
            "mode": args.mode, "micro_batch": micro, "max_seq_length": max_len, "steps": steps,
            "warmup_steps": warmup, "checkpointing": args.checkpointing, "lr": args.lr,
            "peak_tflops": _peak_tflops(args.peak_tflops) if cuda else None}
    modes = ("off", "on") if args.checkpointing == "both" else (args.checkpointing,)
    spec_files = {}
    for mode in modes:
        spec_files[mode] = work / f"spec-{mode}.json"
        spec_files[mode].write_text(json.dumps({**spec, "checkpointing": mode}, indent=1))
    device = torch.cuda.get_device_name(0) if cuda else f"CPU (smoke; {os.cpu_count()} cores)"
    print(f"model: {'tiny Phi-3 shape' if args.smoke else 'Phi-3-mini-4k shape, random init, bf16'} "
          f"({model_dir}), {args.mode}; device: {device}; peak bf16 TFLOP/s for MFU: "
          f"{_fmt(spec['peak_tflops'], '.0f')}", flush=True)
    print(f"data: {stats['rows']} synthetic conversations, templated tokens mean {stats['mean']:.0f}, p50 "
          f"{stats['p50']}, p90 {stats['p90']}, max {stats['max']} (truncated to {max_len}); micro-batch {micro}, "
          f"{steps} steps, tok/s over steps after {warmup}; checkpointing {args.checkpointing}", flush=True)

    results = []
    for name, mode in jobs(run, modes):
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec",
                               str(spec_files[mode])], cwd=REPO, capture_output=True, text=True,
                              timeout=args.timeout)
        found = [line[len(RESULT):] for line in proc.stdout.splitlines() if line.startswith(RESULT)]
        if proc.returncode != 0 or not found:
            tail = (proc.stdout + proc.stderr)[-2500:]
            print(f"{name} (checkpointing {mode}): failed (exit {proc.returncode}):\n{tail}", flush=True)
            results.append({"contender": name, "failed": True})
            continue
        results.append(json.loads(found[-1]))

    print_table(results, args.baseline)
    if cuda:
        for line in target_lines(results, micro_batch=micro, max_seq_length=max_len, mode=args.mode):
            print(line)
    outside = [r["contender"] for r in results if estimate_outside_bound(r)]
    if outside:
        print(f"the memory estimate is outside its bound (est/peak in [0.95, 1.25]) for: {', '.join(outside)}")
    print(f"total {time.perf_counter() - started:.0f} s; work folder {work}")
    return 1 if outside or any(r.get("failed") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
