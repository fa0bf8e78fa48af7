"""Model loading and batched chat generation for the local endpoint.

One `ChatGenerator` wraps a causal LM + its tokenizer. `run_batch` runs many requests through shared decoding
loops (runner/local/endpoint/decoding.py: rows that end leave the batch at the next step, so a cancelled row stops
costing forward passes) even when their sampling settings differ: a per-row logits processor applies each row's own
temperature / top_p / top_k (greedy rows keep only their argmax), and a per-row stopping criterion ends each row at
its own max_new_tokens, stop string, deadline or cancellation. A row's result is handed back the moment the row is
done, not when the whole batch ends, so short answers do not wait for long ones.

If a shared generate call raises, the rows it had not finished are run again one by one, so only the row that
causes the error fails (with that error) and the others still get their answers.
"""

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

log = logging.getLogger("runner.endpoint.generation")

END_TOKEN = "<|end|>"  # Phi-3's end-of-turn token: generation stops there as well as at the tokenizer's eos
DEFAULT_MAX_NEW_TOKENS = 256
# Below this temperature a row decodes greedily (vLLM's rule too): dividing the logits by 1e-38 gave inf, and the
# sampler's "probability tensor contains inf/nan" failed the whole batch; this close to 0 sampling is argmax anyway
GREEDY_BELOW_TEMPERATURE = 1e-5


class ContextLengthError(ValueError):
    """The prompt plus the requested new tokens do not fit in the model's context."""


@dataclass
class GenerationJob:
    """One completion to produce. The batcher fills `result` and calls `on_done` exactly once."""

    prompt_ids: List[int]
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: Sequence[str] = ()
    presence_penalty: float = 0.0  # OpenAI's penalties and logit_bias (runner/local/endpoint/penalties.py)
    frequency_penalty: float = 0.0
    logit_bias: Dict[int, float] = field(default_factory=dict)
    deadline: Optional[float] = None  # time.monotonic() after which the row is abandoned ("timeout")
    on_delta: Optional[Callable[[str], None]] = None  # streaming: called with each new piece of text
    on_done: Optional[Callable[["GenerationResult"], None]] = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def greedy(self) -> bool:
        # transformers raises on temperature=0.0: treat temperature ~0 (or do_sample=false) as greedy instead
        return not self.do_sample or self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # "stop" (eos / stop string), "length", "timeout", "cancelled", "error"
    prompt_tokens: int
    completion_tokens: int
    error: Optional[str] = None


def is_local_model_dir(uri: str) -> bool:
    return "://" not in uri and ":/" not in uri


def serving_device(device: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"; "cuda" without a GPU is an error, not a silent CPU run."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("deployment.device=cuda but no CUDA GPU is visible to the endpoint process")
    return device


def load_components(uri: str):
    """(model, tokenizer) from a save_pretrained folder or an MLflow model URI (models:/name/version, runs:/...)."""
    if is_local_model_dir(uri):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(uri)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {uri!r} holds no config.json (expected a save_pretrained folder)")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
    else:
        import mlflow.transformers

        components = mlflow.transformers.load_model(uri, return_type="components")
        model, tokenizer = components["model"], components["tokenizer"]
    model.eval()
    return model, tokenizer


class _RowSampling:
    """Per-row temperature / top-k / top-p, applied to the logits of the whole batch in one go."""

    def __init__(self, jobs: Sequence[GenerationJob]):
        import torch

        self.greedy = torch.tensor([j.greedy for j in jobs])  # moved to the logits' device on first use
        self.temperature = torch.tensor([j.temperature if not j.greedy else 1.0 for j in jobs]).unsqueeze(1)
        self.top_p = torch.tensor([float(j.top_p) for j in jobs]).unsqueeze(1)
        self.top_k = [int(j.top_k) for j in jobs]

    def __call__(self, input_ids, scores):
        import torch

        if self.greedy.device != scores.device:
            self.greedy, self.temperature, self.top_p = (
                t.to(scores.device) for t in (self.greedy, self.temperature, self.top_p))
        scores = scores.float() / self.temperature  # float32 whatever the model's dtype: no fp16 overflow
        neg_inf = float("-inf")  # as transformers' own warpers: softmax gives these exactly 0
        if any(k > 0 for k in self.top_k):
            sorted_scores = scores.sort(dim=-1, descending=True).values
            for row, k in enumerate(self.top_k):
                if 0 < k < scores.shape[-1]:
                    scores[row] = scores[row].masked_fill(scores[row] < sorted_scores[row, k - 1], neg_inf)
        if bool((self.top_p < 1.0).any()):
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            probs = sorted_scores.softmax(dim=-1)
            # drop a token once the tokens ranked above it already hold top_p of the mass (the first always stays)
            drop_sorted = (probs.cumsum(dim=-1) - probs) > self.top_p.to(probs.dtype)
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, neg_inf)
        if bool(self.greedy.any()):
            best = scores.argmax(dim=-1, keepdim=True)
            only_best = torch.full_like(scores, neg_inf).scatter(-1, best, 0.0)
            scores = torch.where(self.greedy.unsqueeze(1), only_best, scores)
        return scores


class _Row:
    """The bookkeeping of one job inside a running generate call."""

    def __init__(self, job: GenerationJob, tokenizer, eos_ids, tokenizer_lock):
        self.job, self.tokenizer, self.eos_ids, self.lock = job, tokenizer, eos_ids, tokenizer_lock
        self.tokens: List[int] = []
        self.emitted = 0  # characters of text already streamed
        self.text = ""
        self.done = False
        self.watch_text = bool(job.stop) or job.on_delta is not None

    def _held_back(self, text: str) -> int:
        """Characters at the end that may be the start of a stop string (or a split UTF-8 sequence): not yet sent."""
        hold = 1 if text.endswith("\ufffd") else 0
        for stop in self.job.stop:
            for n in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        return hold

    def add(self, token: int) -> Optional[str]:
        """Take one generated token; returns a finish reason once the row is done."""
        self.tokens.append(token)
        if token in self.eos_ids:
            return "stop"
        if self.watch_text:
            with self.lock:
                self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
            for stop in self.job.stop:
                at = self.text.find(stop)
                if at >= 0:
                    self.text = self.text[:at]
                    return "stop"
            self._stream(len(self.text) - self._held_back(self.text))
        if len(self.tokens) >= self.job.max_new_tokens:
            return "length"
        return None

    def _stream(self, upto: int):
        if self.job.on_delta is not None and upto > self.emitted:
            piece, self.emitted = self.text[self.emitted:upto], upto
            try:
                self.job.on_delta(piece)
            except Exception:  # a stream consumer that went away must not break the other rows
                pass

    def finish(self, reason: str, error: Optional[str] = None) -> GenerationResult:
        self.done = True
        if not self.watch_text:
            kept = [t for t in self.tokens if t not in self.eos_ids]
            with self.lock:
                self.text = self.tokenizer.decode(kept, skip_special_tokens=True)
        if reason in ("stop", "length"):
            self._stream(len(self.text))
        return GenerationResult(self.text, reason, len(self.job.prompt_ids), len(self.tokens), error)


def deliver(job: GenerationJob, result: GenerationResult):
    if job.on_done is not None:
        try:
            job.on_done(result)
        except Exception:  # a consumer that went away must not break the other rows of the batch
            pass


class ChatGenerator:
    """A loaded chat model: prompt encoding, context checks and batched generation."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        # fast tokenizers are not safe to call from two threads at once (the server encodes, the worker decodes)
        self.tokenizer_lock = threading.Lock()
        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template: the endpoint needs one to build prompts")
        eos = set()
        for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            eos.update(source if isinstance(source, (list, tuple)) else [source] if source is not None else [])
        end_id = tokenizer.convert_tokens_to_ids(END_TOKEN)
        if isinstance(end_id, int) and end_id != tokenizer.unk_token_id:
            eos.add(end_id)
        self.eos_ids = sorted(eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.context_length = self._context_length()
        self.on_forward: Optional[Callable[[int], None]] = None  # told each forward pass's batch size (tests, stats)

    @classmethod
    def from_uri(cls, uri: str, device: str = "cpu") -> "ChatGenerator":
        model, tokenizer = load_components(uri)
        target = serving_device(device)
        if target != "cpu":
            from runner.local.packing import avoid_per_shape_attention_plans

            avoid_per_shape_attention_plans()  # every decoding step is a new key length
            model.to(target)
        return cls(model, tokenizer)

    def _context_length(self) -> int:
        limit = getattr(self.model.config, "max_position_embeddings", None) or 4096
        tok_limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_limit, int) and 0 < tok_limit < 10**8:  # transformers' "unlimited" is a huge int
            limit = min(limit, tok_limit)
        return int(limit)

    def encode_chat(self, messages) -> List[int]:
        with self.tokenizer_lock:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            # the template already writes the special tokens it wants
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_fits(self, prompt_len: int, max_new_tokens: Optional[int]) -> int:
        """The max_new_tokens to use: the requested one if it fits in the context, otherwise an error."""
        room = self.context_length - prompt_len
        if max_new_tokens is None:
            if room < 1:
                raise ContextLengthError(
                    f"the prompt is {prompt_len} tokens; the model's context is {self.context_length} tokens")
            return min(DEFAULT_MAX_NEW_TOKENS, room)
        if max_new_tokens > room:
            raise ContextLengthError(
                f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) is more than the model's "
                f"context of {self.context_length} tokens; at most {max(room, 0)} new tokens fit")
        return max_new_tokens

    def _sub_batches(self, jobs: Sequence[GenerationJob]) -> List[List[GenerationJob]]:
        """Rows share padding and cache length, so a sub-batch keeps longest prompt + longest answer in context."""
        groups: List[List[GenerationJob]] = []
        for job in sorted(jobs, key=lambda j: len(j.prompt_ids)):
            if groups:
                group = groups[-1]
                longest_prompt = max(len(job.prompt_ids), *(len(j.prompt_ids) for j in group))
                longest_answer = max(job.max_new_tokens, *(j.max_new_tokens for j in group))
                if longest_prompt + longest_answer <= self.context_length:
                    group.append(job)
                    continue
            groups.append([job])
        return groups

    def run_batch(self, jobs: Sequence[GenerationJob]) -> None:
        """Generate for all jobs; each job's on_done gets its result as soon as its row is done."""
        for group in self._sub_batches(jobs):
            self._run_group(group)

    def _run_group(self, jobs: Sequence[GenerationJob]) -> None:
        import torch

        from runner.local.endpoint.decoding import decode
        from runner.local.endpoint.penalties import TokenPenalties, needs_adjusting

        rows = [_Row(job, self.tokenizer, set(self.eos_ids), self.tokenizer_lock) for job in jobs]
        live = []
        for row in rows:  # rows that are already late or abandoned never enter the batch
            reason = self._abandon_reason(row.job, time.monotonic())
            if reason:
                deliver(row.job, row.finish(reason))
            else:
                live.append(row)
        if not live:
            return
        rows = live
        width = max(len(r.job.prompt_ids) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # left padding: every row's last prompt token sits in the last column
            n = len(row.job.prompt_ids)
            input_ids[i, width - n:] = torch.tensor(row.job.prompt_ids, dtype=torch.long)
            attention[i, width - n:] = 1

        generator = self

        def on_step(active, newest):
            """Each live row takes its new token; returns which of them have ended (they leave the batch)."""
            now, ended = time.monotonic(), []
            for i, token in zip(active, newest):
                row = rows[i]
                reason = row.add(token) or generator._abandon_reason(row.job, now)
                if reason:
                    deliver(row.job, row.finish(reason))
                ended.append(row.done)
            return ended

        sample = not all(r.job.greedy for r in rows)

        def processors_for(active):
            jobs = [rows[i].job for i in active]
            # while the batch samples, greedy rows too go through _RowSampling, which leaves them their argmax only
            processors = [_RowSampling(jobs)] if sample else []
            if any(needs_adjusting(job) for job in jobs):  # penalties and biases first, on the raw logits
                processors.insert(0, TokenPenalties(jobs, width))
            return processors

        try:
            decode(self.model, input_ids, attention, max_new_tokens=max(r.job.max_new_tokens for r in rows),
                   sample=sample, processors_for=processors_for, on_step=on_step,
                   on_forward=self.on_forward)
        except Exception as exc:  # the server keeps serving; only the row that causes an error fails
            self._isolate(rows, exc)
            return
        for row in rows:  # the loop ended (its max length) before a row's own end was seen
            if not row.done:
                deliver(row.job, row.finish("length"))

    def _isolate(self, rows: Sequence[_Row], exc: Exception) -> None:
        """A shared generate call raised: each unfinished row runs again on its own, so an error then is that row's
        own. A row alone, or one that already streamed text (a rerun would send it twice), fails with the error."""
        error = f"{type(exc).__name__}: {exc}"
        pending = [row for row in rows if not row.done]
        if len(rows) > 1:
            log.warning("a batch of %d failed (%s); running its %d unfinished rows one by one", len(rows), error,
                        len(pending))
        for row in pending:
            if len(rows) == 1 or row.emitted:
                deliver(row.job, row.finish("error", error))
            else:
                self._run_group([row.job])

    @staticmethod
    def _abandon_reason(job: GenerationJob, now: float) -> Optional[str]:
        if job.cancelled.is_set():
            return "cancelled"
        if job.deadline is not None and now >= job.deadline:
            return "timeout"
        return None

    def generate_one(self, messages, *, max_new_tokens: int, **sampling) -> GenerationResult:
        """Convenience for callers outside the server: one chat completion, no batching."""
        results: List[GenerationResult] = []
        prompt = self.encode_chat(messages)
        job = GenerationJob(prompt, self.check_fits(len(prompt), max_new_tokens), on_done=results.append, **sampling)
        self.run_batch([job])
        return results[0]


def set_torch_threads(n: Optional[int] = None, model=None) -> int:
    """Torch threads for generation. A small model is dominated by per-op overhead, and on a busy machine extra
    OpenMP threads wait on each other: measured on 2 shared cores, the tiny model generated 300 tokens in ~0.5 s
    with 1 thread and 2-5 s with 2. So: 1 thread below 100M parameters, all cores above, unless told."""
    import torch

    if not n:
        params = sum(p.numel() for p in model.parameters()) if model is not None else 0
        n = 1 if params < 100_000_000 else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n
