"""Scored rows -> the evaluation's result: one Comparison per metric and, per row, both models' scores and whether
the row improved or regressed.

A row "improved" when the fine-tuned model did better than the base on the *primary* metric (the first chosen
metric with a better direction that has a per-row value worth reading: ROUGE-L by default, loss when only
teacher-forced metrics were asked for), "regressed" when it did worse, "unchanged" otherwise.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from runner.evaluation.metrics import NEITHER, Metric, RowOutput
from runner.evaluation.stats import DEFAULT_RESAMPLES, Comparison, compare, resample_counts

# Which metric decides "improved / regressed" per row, in order of preference
_PRIMARY_ORDER = ["rouge_l", "chrf", "bleu", "exact_match", "loss", "token_accuracy", "perplexity", "stop_rate"]
_TIE = 1e-9


@dataclass
class EvalRow:
    """One held-out conversation: the prompt (the conversation before its last assistant turn) and the reference
    (that turn's content). `index` is its 0-based row number in `source`."""

    index: int
    prompt: List[Dict[str, str]]
    reference: str
    source: str = ""


@dataclass
class Evaluation:
    rows: List[EvalRow]
    base: List[RowOutput]
    ft: List[RowOutput]
    metrics: List[Metric]
    comparisons: List[Comparison]
    row_scores: Dict[str, Dict[str, np.ndarray]]  # {"base"|"ft": {metric: per-row values}}
    primary: str
    changes: List[str]  # per row: improved / regressed / unchanged
    seed: int
    info: Dict[str, Any] = field(default_factory=dict)  # rows/s, seconds, models, stopped early, ...

    def comparison(self, name: str) -> Comparison:
        return next(c for c in self.comparisons if c.metric == name)

    def counts(self) -> Dict[str, int]:
        return {word: self.changes.count(word) for word in ("improved", "regressed", "unchanged")}


def primary_metric(metrics: Sequence[Metric]) -> str:
    names = [m.name for m in metrics if m.direction != NEITHER]
    for name in _PRIMARY_ORDER:
        if name in names:
            return name
    return names[0] if names else metrics[0].name


def _row_change(metric: Metric, base: float, ft: float) -> str:
    if np.isnan(base) or np.isnan(ft) or abs(ft - base) <= _TIE or metric.direction == NEITHER:
        return "unchanged"
    up = ft > base
    return "improved" if up == (metric.direction > 0) else "regressed"


def evaluate_outputs(rows: Sequence[EvalRow], base: Sequence[RowOutput], ft: Sequence[RowOutput],
                     metrics: Sequence[Metric], *, seed: int, resamples: int = DEFAULT_RESAMPLES,
                     info: Optional[Dict[str, Any]] = None) -> Evaluation:
    """Compare both models on the rows; every metric uses the same bootstrap draw of rows (seeded)."""
    if not (len(rows) == len(base) == len(ft)) or not rows:
        raise ValueError(f"need the same non-empty rows for both models (rows {len(rows)}, base {len(base)}, "
                         f"fine-tuned {len(ft)})")
    references = [r.reference for r in rows]
    counts = resample_counts(len(rows), resamples, seed)
    comparisons, row_scores = [], {"base": {}, "ft": {}}
    for metric in metrics:
        base_stats, ft_stats = metric.stats(base, references), metric.stats(ft, references)
        comparisons.append(compare(metric, base_stats, ft_stats, seed=seed, counts=counts))
        row_scores["base"][metric.name] = metric.row_values(base, references, base_stats)
        row_scores["ft"][metric.name] = metric.row_values(ft, references, ft_stats)
    primary = primary_metric(metrics)
    by_name = {m.name: m for m in metrics}
    changes = [_row_change(by_name[primary], b, f)
               for b, f in zip(row_scores["base"][primary], row_scores["ft"][primary])]
    return Evaluation(list(rows), list(base), list(ft), list(metrics), comparisons, row_scores, primary, changes,
                      seed, dict(info or {}))
