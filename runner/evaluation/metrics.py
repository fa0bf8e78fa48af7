"""The evaluation metrics: what each one means, how it is computed from per-row statistics, and which way is better.

Every metric is defined the same way, so one bootstrap (runner/evaluation/stats.py) serves them all: each row gives
a small vector of *statistics* and the metric is a function of their sum over rows.

    mean metrics  (ROUGE-L F, exact match, reply length, stop rate): stats [value, 1]      -> sum0 / sum1
    ratio metrics (loss, token accuracy, perplexity):                stats [sum, tokens]   -> sum0 / sum1 (exp for ppl)
    corpus metrics (BLEU, chrF): sacrebleu's own sufficient statistics (n-gram matches and totals) -> its formula

So loss is token-weighted (as the trainer's eval loss), BLEU and chrF are corpus scores (as sacrebleu reports them),
and resampling rows resamples exactly what the metric is computed from.

Scales: BLEU and chrF are on sacrebleu's 0-100 scale (as papers report them); ROUGE-L, exact match, token accuracy
and stop rate on 0-1; loss in nats per token; reply length in model tokens.

Metrics come from maintained offline packages: `sacrebleu` (BLEU, chrF) and `rouge-score` (ROUGE-L). The
`evaluate` package is not used: it fetches metric scripts from a hub at run time.
"""

import math
import re
import string
import unicodedata
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from runner.errors import RunnerError

HIGHER, LOWER, NEITHER = 1, -1, 0  # Metric.direction: which way is better (NEITHER: descriptive only)


@dataclass
class RowOutput:
    """What one model did on one evaluation row. Teacher-forced fields are None when that part was not run, the
    generated ones when no reply was generated."""

    reply: Optional[str] = None
    stopped: Optional[bool] = None  # the reply ended on the end token (not cut at max_new_tokens)
    reply_tokens: Optional[int] = None
    nll_sum: Optional[float] = None  # summed negative log-likelihood of the reference's assistant tokens (nats)
    target_tokens: Optional[int] = None  # how many reference tokens were scored
    correct_tokens: Optional[int] = None  # of those, how many were the model's argmax


# ---- text metrics on one pair ----------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalise_answer(text: str) -> str:
    """The normalisation exact match uses (SQuAD's, made Unicode-aware): NFKC, lower case, punctuation (any
    Unicode P* character) removed, the English articles a/an/the removed, whitespace collapsed. So "The cat, sat!"
    and "cat sat" match; "cat sat" and "cats sat" do not."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if (ch in _PUNCT or unicodedata.category(ch).startswith("P")) else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(reply: str, reference: str) -> float:
    return float(normalise_answer(reply) == normalise_answer(reference))


class _UnicodeWords:
    """rouge-score's default tokenizer keeps only [a-z0-9] and scores any non-English reply 0; this one keeps
    letters and digits of every script (lower-cased) and is identical to the default on ASCII text."""

    _WORD = re.compile(r"[^\W_]+")

    def tokenize(self, text: str) -> List[str]:
        return self._WORD.findall(unicodedata.normalize("NFKC", text).lower())


_ROUGE = None


def rouge_l_f(reply: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words), rouge-score's implementation."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeWords())
    return float(_ROUGE.score(reference, reply)["rougeL"].fmeasure)


def _bleu(sentence: bool = False):
    from sacrebleu.metrics import BLEU

    # a single sentence rarely has a 4-gram match: sentence BLEU uses the orders it has (sacrebleu's own advice)
    return BLEU(effective_order=True) if sentence else BLEU()


def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


def _sacrebleu_stats(scorer, replies: Sequence[str], references: Sequence[str]) -> np.ndarray:
    return np.asarray(scorer._extract_corpus_statistics(list(replies), [list(references)]), dtype=np.float64)


def _sacrebleu_reduce(make_scorer) -> Callable[[np.ndarray], np.ndarray]:
    """sacrebleu's own score-from-summed-statistics, row by row over a (..., k) array (its paired bootstrap does
    the same)."""

    def reduce(sums: np.ndarray) -> np.ndarray:
        scorer = make_scorer()
        flat = np.asarray(sums).reshape(-1, np.shape(sums)[-1])
        values = [scorer._compute_score_from_stats([int(round(x)) for x in row]).score for row in flat]
        return np.asarray(values, dtype=np.float64).reshape(np.shape(sums)[:-1])

    return reduce


# ---- the registry ----------------------------------------------------------------------------------------------

def _ratio(sums: np.ndarray) -> np.ndarray:
    sums = np.asarray(sums, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums[..., 0] / sums[..., 1]


def _perplexity(sums: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.exp(_ratio(sums))


def _column(values, weights=None) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    weights = np.ones_like(values) if weights is None else np.asarray(weights, dtype=np.float64)
    return np.stack([values, weights], axis=-1)


def _need(outputs: Sequence[RowOutput], field_name: str, metric: str) -> list:
    values = [getattr(o, field_name) for o in outputs]
    if any(v is None for v in values):
        raise RunnerError(f"metric {metric!r} needs {field_name} for every row, and some rows have none")
    return values


@dataclass(frozen=True)
class Metric:
    name: str  # the config / record name (evaluate.metrics, eval_base_<name>)
    label: str  # how tables and plots show it
    direction: int  # HIGHER, LOWER or NEITHER is better
    kind: str  # "teacher_forced" (needs the reference's token scores) or "generated" (needs replies)
    stats: Callable[[Sequence[RowOutput], Sequence[str]], np.ndarray]  # (outputs, references) -> (rows, k)
    reduce: Callable[[np.ndarray], np.ndarray]  # summed stats (..., k) -> value(s)
    per_row: Optional[Callable[[Sequence[RowOutput], Sequence[str]], np.ndarray]] = None  # default: reduce(row)
    digits: int = 3

    def value(self, stats: np.ndarray) -> float:
        return float(self.reduce(np.asarray(stats).sum(axis=0)))

    def row_values(self, outputs: Sequence[RowOutput], references: Sequence[str], stats: np.ndarray) -> np.ndarray:
        if self.per_row is not None:
            return self.per_row(outputs, references)
        return self.reduce(stats)


def _teacher_forced(field_name: str):
    def stats(outputs, references):
        return _column(_need(outputs, field_name, field_name), _need(outputs, "target_tokens", field_name))
    return stats


def _replies(outputs, metric):
    return _need(outputs, "reply", metric)


METRICS: Dict[str, Metric] = {m.name: m for m in [
    Metric("loss", "Loss", LOWER, "teacher_forced", _teacher_forced("nll_sum"), _ratio),
    Metric("perplexity", "Perplexity", LOWER, "teacher_forced", _teacher_forced("nll_sum"), _perplexity, digits=2),
    Metric("token_accuracy", "Token accuracy", HIGHER, "teacher_forced", _teacher_forced("correct_tokens"), _ratio),
    Metric("rouge_l", "ROUGE-L", HIGHER, "generated",
           lambda o, r: _column([rouge_l_f(h, ref) for h, ref in zip(_replies(o, "rouge_l"), r)]), _ratio),
    Metric("bleu", "BLEU", HIGHER, "generated",
           lambda o, r: _sacrebleu_stats(_bleu(), _replies(o, "bleu"), r), _sacrebleu_reduce(_bleu),
           per_row=lambda o, r: np.asarray([_bleu(sentence=True).sentence_score(h, [ref]).score
                                            for h, ref in zip(_replies(o, "bleu"), r)]), digits=1),
    Metric("chrf", "chrF", HIGHER, "generated",
           lambda o, r: _sacrebleu_stats(_chrf(), _replies(o, "chrf"), r), _sacrebleu_reduce(_chrf),
           per_row=lambda o, r: np.asarray([_chrf().sentence_score(h, [ref]).score
                                            for h, ref in zip(_replies(o, "chrf"), r)]), digits=1),
    Metric("exact_match", "Exact match", HIGHER, "generated",
           lambda o, r: _column([exact_match(h, ref) for h, ref in zip(_replies(o, "exact_match"), r)]), _ratio),
    Metric("reply_length", "Reply length", NEITHER, "generated",
           lambda o, r: _column(_need(o, "reply_tokens", "reply_length")), _ratio, digits=1),
    Metric("stop_rate", "Stopped on end token", HIGHER, "generated",
           lambda o, r: _column([float(s) for s in _need(o, "stopped", "stop_rate")]), _ratio),
]}

DEFAULT_METRICS = list(METRICS)


def resolve_metrics(names: Sequence[str], *, key: str = "evaluate.metrics") -> List[Metric]:
    """The Metric objects for configured names; an unknown or repeated name is a clear error."""
    import difflib

    names = list(names)
    if not names:
        raise RunnerError(f"{key} is empty: name at least one of {', '.join(METRICS)}")
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(str(n), list(METRICS), n=1, cutoff=0.6)
            hints.append(f"{n!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise RunnerError(f"{key} names unknown metric(s) {', '.join(hints)}; known metrics: {', '.join(METRICS)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise RunnerError(f"{key} names {repeated} more than once")
    return [METRICS[n] for n in names]


def needs(metrics: Sequence[Metric]) -> Dict[str, bool]:
    """Which halves of the evaluation the chosen metrics need (a loss-only evaluation generates nothing)."""
    return {"teacher_forced": any(m.kind == "teacher_forced" for m in metrics),
            "generated": any(m.kind == "generated" for m in metrics)}


def teacher_forced_summary(outputs: Sequence[RowOutput]) -> Dict[str, float]:
    """Mean loss (token-weighted), perplexity and token accuracy from the rows' sums."""
    nll = sum(o.nll_sum for o in outputs)
    tokens = sum(o.target_tokens for o in outputs)
    correct = sum(o.correct_tokens for o in outputs)
    loss = nll / tokens if tokens else math.nan
    return {"loss": loss, "perplexity": math.exp(loss) if tokens else math.nan,
            "token_accuracy": correct / tokens if tokens else math.nan}
