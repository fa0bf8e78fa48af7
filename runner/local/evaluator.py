"""The local evaluator: base and fine-tuned model on the same held-out rows, in one process.

Models. A LoRA adapter (`adapter_dir`) is loaded once on top of the base weights and the base is scored with the
adapter switched off (PEFT's `disable_adapter()`): the same loaded weights, no second copy in memory. A merged or
fully fine-tuned model (`ft_dir`) is a second set of weights: both stay loaded so the rows can alternate between
the models batch by batch (a time budget then always ends with both models on the same rows).
The fine-tuned model's tokenizer (and chat template) is used for both, as the endpoint will serve it.

Per batch of rows, for each model:
  - teacher-forced: the conversation with its reference turn, one forward pass; the negative log-likelihood and
    the argmax hits summed over the reference turn's assistant tokens (its content and end-of-turn token, as the
    trainer's labels mark them);
  - generated: the prompt through the endpoint's own code (runner/local/endpoint/generation.py: `encode_chat`,
    `GenerationJob`, `ChatGenerator.run_batch`), so the replies are the ones the deployed model would give.
Greedy by default; seeded (torch.manual_seed per batch, the same for both models) when sampling.

Rows are batched in order of prompt length (less padding), `batch_size` at a time. Progress (rows done, rows/s)
goes to `progress`. `time_budget_s` ends the evaluation after the batch that crosses it, on the rows done so far.
Bad input stops it before any model is loaded: see runner/evaluation/rows.py, plus rows too long for the context.
"""

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from runner.evaluation.metrics import DEFAULT_METRICS, RowOutput, needs, resolve_metrics
from runner.evaluation.results import EvalRow, Evaluation, evaluate_outputs
from runner.evaluation.rows import EvaluationDataError, load_rows
from runner.evaluation.stats import DEFAULT_RESAMPLES

IGNORE_INDEX = -100
_SHOWN = 5


@dataclass
class EvaluatorSettings:
    """The `evaluate:` config section's knobs that the engine reads."""

    max_rows: Optional[int] = 200
    max_new_tokens: int = 128
    batch_size: int = 16
    seed: int = 42
    time_budget_s: float = 0.0  # 0: no budget
    metrics: List[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    resamples: int = DEFAULT_RESAMPLES
    device: str = "auto"
    torch_threads: Optional[int] = None  # None: as the endpoint chooses (runner.local.endpoint.generation)


# ---- the models -------------------------------------------------------------------------------------------------

class ModelPair:
    """The base and the fine-tuned model as two ChatGenerators behind `use("base" | "ft")`."""

    def __init__(self, base_dir, *, adapter_dir=None, ft_dir=None, device: str = "auto",
                 torch_threads: Optional[int] = None):
        from runner.local.endpoint.generation import ChatGenerator, load_components, serving_device, \
            set_torch_threads

        if (adapter_dir is None) == (ft_dir is None):
            raise ValueError("give exactly one of adapter_dir (a LoRA adapter) or ft_dir (a merged/full model)")
        self.device = serving_device(device)
        if self.device != "cpu":  # as ChatGenerator.from_uri does for the endpoint: every decoding step is a new
            from runner.local.packing import avoid_per_shape_attention_plans  # key length

            avoid_per_shape_attention_plans()
        base, base_tokenizer = load_components(str(base_dir))
        if adapter_dir is not None:
            from peft import PeftModel

            self.mode = "adapter"
            tokenizer = _tokenizer_of(adapter_dir) or base_tokenizer
            model = PeftModel.from_pretrained(base, str(adapter_dir)).to(self.device).eval()
            self.shared = ChatGenerator(model, tokenizer)
            self._generators = None
        else:
            self.mode = "merged"
            ft, ft_tokenizer = load_components(str(ft_dir))
            self._generators = {"base": ChatGenerator(base.to(self.device), ft_tokenizer),
                                "ft": ChatGenerator(ft.to(self.device), ft_tokenizer)}
            self.shared = self._generators["ft"]
        self.tokenizer = self.shared.tokenizer
        self.context_length = min([self.shared.context_length] + [
            g.context_length for g in (self._generators or {}).values()])
        self.threads = set_torch_threads(torch_threads, self.shared.model)

    @contextlib.contextmanager
    def use(self, which: str):
        """The ChatGenerator that scores `which`; for an adapter, the base is the same model with it switched off."""
        if self._generators is not None:
            yield self._generators[which]
        elif which == "base":
            with self.shared.model.disable_adapter():
                yield self.shared
        else:
            yield self.shared


def _tokenizer_of(folder):
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer_config.json").exists():
        return None
    return AutoTokenizer.from_pretrained(folder)


# ---- rows as token ids, checked against the context -------------------------------------------------------------

@dataclass
class _Encoded:
    prompt_ids: List[int]  # what the endpoint would feed to generate
    input_ids: List[int]  # prompt + reference turn, through the chat template
    labels: List[int]  # the reference turn's assistant tokens, IGNORE_INDEX elsewhere


def _last_span(labels: List[int]) -> List[int]:
    """Keep only the last contiguous run of labelled tokens: the reference turn (earlier assistant turns are part
    of the prompt, not of what is scored)."""
    out = [IGNORE_INDEX] * len(labels)
    i = len(labels) - 1
    while i >= 0 and labels[i] == IGNORE_INDEX:
        i -= 1
    while i >= 0 and labels[i] != IGNORE_INDEX:
        out[i] = labels[i]
        i -= 1
    return out


def encode_rows(rows: Sequence[EvalRow], generator, *, max_new_tokens: int, context_length: int,
                teacher_forced: bool, generated: bool) -> List[_Encoded]:
    """Token ids of every row; rows that do not fit in the context are an error naming them, before any scoring."""
    from runner.data.prepare import tokenize_conversation

    encoded, too_long = [], []
    for row in rows:
        prompt_ids = generator.encode_chat(row.prompt)
        full = tokenize_conversation(row.prompt + [{"role": "assistant", "content": row.reference}],
                                     generator.tokenizer, None)
        labels = _last_span(full["labels"])
        need = max(len(full["input_ids"]) if teacher_forced else 0,
                   len(prompt_ids) + max_new_tokens if generated else 0)
        if need > context_length:
            too_long.append((row, len(prompt_ids), len(full["input_ids"])))
        if teacher_forced and all(x == IGNORE_INDEX for x in labels):
            raise EvaluationDataError(f"{row.source}: the chat template marks no assistant token in the reference "
                                      f"turn, so it cannot be scored")
        encoded.append(_Encoded(prompt_ids, full["input_ids"], labels))
    if too_long:
        shown = "; ".join(f"{r.source} (prompt {p} tokens, with the reference {f})" for r, p, f in too_long[:_SHOWN])
        raise EvaluationDataError(
            f"{len(too_long)} of {len(rows)} rows do not fit the model's context of {context_length} tokens "
            f"(prompt + evaluate.max_new_tokens={max_new_tokens} for generation, prompt + reference for the loss): "
            f"{shown}{' ...' if len(too_long) > _SHOWN else ''}. Lower evaluate.max_new_tokens or leave those rows "
            f"out of the file")
    return encoded


# ---- scoring one batch -----------------------------------------------------------------------------------------

def teacher_forced_batch(model, encoded: Sequence[_Encoded], pad_id: int) -> List[Tuple[float, int, int]]:
    """(nll sum, tokens, argmax hits) over each row's reference tokens: one right-padded forward pass."""
    import torch

    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        attention[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
        target = labels[:, 1:].to(logits.device)  # position t predicts token t+1
        scored = target != IGNORE_INDEX
        row_of = scored.nonzero(as_tuple=True)[0]
        # only the scored positions go to float32: a (tokens x vocab) slice, not the whole batch's logits
        picked = logits[:, :-1][scored].float()
        wanted = target[scored]
        nll = torch.nn.functional.cross_entropy(picked, wanted, reduction="none")
        hits = (picked.argmax(dim=-1) == wanted).to(nll.dtype)
        sums = torch.zeros((3, len(encoded)), dtype=nll.dtype, device=nll.device)
        sums[0].index_add_(0, row_of, nll)
        sums[1].index_add_(0, row_of, torch.ones_like(nll))
        sums[2].index_add_(0, row_of, hits)
    nll_rows, counts, hit_rows = sums.cpu().tolist()
    return [(nll_rows[i], int(counts[i]), int(hit_rows[i])) for i in range(len(encoded))]


def generate_batch(generator, encoded: Sequence[_Encoded], settings: EvaluatorSettings):
    """The endpoint's batched generation on the prompts: (text, stopped on the end token, tokens) per row."""
    from runner.local.endpoint.generation import GenerationJob

    results: List = [None] * len(encoded)
    jobs = []
    for i, e in enumerate(encoded):
        jobs.append(GenerationJob(e.prompt_ids, settings.max_new_tokens, do_sample=settings.do_sample,
                                  temperature=settings.temperature, top_p=settings.top_p,
                                  on_done=lambda r, i=i: results.__setitem__(i, r)))
    generator.run_batch(jobs)
    for r in results:
        if r is None or r.finish_reason == "error":
            raise RuntimeError(f"generation failed during the evaluation: {getattr(r, 'error', 'no result')}")
    return [(r.text, r.finish_reason == "stop", r.completion_tokens) for r in results]


def _score_batch(pair: ModelPair, which: str, encoded, settings, need, batch_seed: int) -> List[RowOutput]:
    import torch

    outputs = [RowOutput() for _ in encoded]
    with pair.use(which) as generator:
        if need["teacher_forced"]:
            for out, (nll, n, hits) in zip(outputs, teacher_forced_batch(generator.model, encoded, generator.pad_id)):
                out.nll_sum, out.target_tokens, out.correct_tokens = nll, n, hits
        if need["generated"]:
            torch.manual_seed(batch_seed)  # the same sampler stream for both models on this batch
            for out, (text, stopped, tokens) in zip(outputs, generate_batch(generator, encoded, settings)):
                out.reply, out.stopped, out.reply_tokens = text, stopped, tokens
    return outputs


# ---- the whole evaluation --------------------------------------------------------------------------------------

def _prewarm_metric_imports(metrics) -> None:
    """rouge-score imports nltk (and scipy with it): ~2-6 s on a busy 2-core machine. Import it in a thread while
    the models load and score, so the import overlaps that work instead of following it."""
    import threading

    if any(m.name == "rouge_l" for m in metrics):
        threading.Thread(target=lambda: __import__("rouge_score.rouge_scorer"), name="prewarm-rouge",
                         daemon=True).start()


def _log(progress: Optional[Callable[[str], None]], text: str) -> None:
    if progress is not None:
        progress(text)


def evaluate(*, base_dir, rows_file, adapter_dir=None, ft_dir=None, settings: EvaluatorSettings = None,
             train_file=None, progress: Optional[Callable[[str], None]] = print) -> Evaluation:
    """Score base and fine-tuned on the rows of `rows_file`; returns the Evaluation (write it with
    runner.evaluation.report.write_outputs)."""
    settings = settings or EvaluatorSettings()
    metrics = resolve_metrics(settings.metrics)  # an unknown name fails before anything is read or loaded
    need = needs(metrics)
    rows = load_rows(rows_file, max_rows=settings.max_rows, seed=settings.seed, train_file=train_file)
    if settings.batch_size < 1 or settings.max_new_tokens < 1:
        raise EvaluationDataError(f"evaluate.batch_size={settings.batch_size} and evaluate.max_new_tokens="
                                  f"{settings.max_new_tokens} must both be at least 1")
    _prewarm_metric_imports(metrics)
    started = time.monotonic()
    pair = ModelPair(base_dir, adapter_dir=adapter_dir, ft_dir=ft_dir, device=settings.device,
                     torch_threads=settings.torch_threads)
    encoded = encode_rows(rows, pair.shared, max_new_tokens=settings.max_new_tokens,
                          context_length=pair.context_length, **need)
    loaded_s = time.monotonic() - started
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i].prompt_ids))
    base_out: Dict[int, RowOutput] = {}
    ft_out: Dict[int, RowOutput] = {}
    scoring_started = time.monotonic()
    stopped_early = False
    for batch_no, start in enumerate(range(0, len(order), settings.batch_size)):
        picked = order[start:start + settings.batch_size]
        batch = [encoded[i] for i in picked]
        for which, into in (("base", base_out), ("ft", ft_out)):
            for i, out in zip(picked, _score_batch(pair, which, batch, settings, need, settings.seed + batch_no)):
                into[i] = out
        elapsed = time.monotonic() - scoring_started
        done = len(ft_out)
        rate = done / elapsed if elapsed > 0 else float("inf")
        eta = f", about {(len(rows) - done) / rate:.0f} s left" if done < len(rows) and rate > 0 else ""
        _log(progress, f"    evaluate: {done}/{len(rows)} rows (base + fine-tuned), {rate:.2f} rows/s{eta}")
        if settings.time_budget_s and elapsed >= settings.time_budget_s and done < len(rows):
            stopped_early = True
            _log(progress, f"    evaluate: time budget of {settings.time_budget_s:g} s reached; scoring the {done} "
                           f"rows done")
            break
    scoring_s = time.monotonic() - scoring_started
    kept = sorted(ft_out)  # file order
    info = {"mode": pair.mode, "base_dir": str(base_dir), "adapter_dir": str(adapter_dir) if adapter_dir else None,
            "ft_dir": str(ft_dir) if ft_dir else None, "rows_file": str(rows_file), "rows_selected": len(rows),
            "rows_scored": len(kept), "stopped_early": stopped_early, "load_s": round(loaded_s, 3),
            "scoring_s": round(scoring_s, 3), "rows_per_s": round(len(kept) / scoring_s, 3) if scoring_s else None,
            "batch_size": settings.batch_size, "max_new_tokens": settings.max_new_tokens,
            "do_sample": settings.do_sample, "device": pair.device, "torch_threads": pair.threads}
    return evaluate_outputs([rows[i] for i in kept], [base_out[i] for i in kept], [ft_out[i] for i in kept],
                            metrics, seed=settings.seed, resamples=settings.resamples, info=info)
