"""Fine-tuned minus base, with a paired bootstrap 95% interval over rows, and the verdict word.

Paired: base and fine-tuned answered the same rows, so each bootstrap resample draws rows (with replacement) once
and recomputes *both* models' metric on that same draw; the spread of the difference then reflects how much the
rows disagree, not the (larger) spread of either score alone. Each metric is a function of its rows' summed
statistics (runner/evaluation/metrics.py), so a resample is a matrix product: counts (B x rows) @ stats (rows x k).

Verdict: the interval lies wholly on the better side of 0 -> `better`, wholly on the worse side -> `worse`,
otherwise (it contains 0) `no clear difference`. For a metric with no better direction (reply length) the words
are `higher` / `lower` / `no clear difference`. With identical base and fine-tuned outputs every resampled
difference is exactly 0, so the interval is [0, 0] and the verdict is `no clear difference`.
"""

from dataclasses import asdict, dataclass
from typing import Dict, Optional

import numpy as np

from runner.evaluation.metrics import HIGHER, LOWER, Metric

BETTER, WORSE, UNCLEAR = "better", "worse", "no clear difference"
DEFAULT_RESAMPLES = 1000
CONFIDENCE = 0.95
NOISE = 1e-6  # relative: interval ends closer to 0 than this count as 0


@dataclass
class Comparison:
    metric: str
    label: str
    direction: int
    base: float
    ft: float
    delta: float  # ft - base on all rows
    ci_low: float  # the 95% interval of ft - base
    ci_high: float
    verdict: str
    rows: int
    resamples: int
    # each model's own (unpaired) 95% interval, from the same resamples: for error bars, not for the verdict
    base_ci: tuple = (float("nan"), float("nan"))
    ft_ci: tuple = (float("nan"), float("nan"))

    def to_dict(self) -> Dict:
        return asdict(self)


def verdict(direction: int, ci_low: float, ci_high: float, tolerance: float = 0.0) -> str:
    """The word for an interval of the change; ends within `tolerance` of 0 count as 0 (float noise, e.g. a merged
    model whose weights differ from the base's only by rounding, is not a difference)."""
    if np.isnan(ci_low) or np.isnan(ci_high):
        return UNCLEAR  # no finite resample: nothing can be said
    if ci_low > tolerance:
        side = "up"
    elif ci_high < -tolerance:
        side = "down"
    else:
        return UNCLEAR
    if direction == HIGHER:
        return BETTER if side == "up" else WORSE
    if direction == LOWER:
        return BETTER if side == "down" else WORSE
    return "higher" if side == "up" else "lower"


def resample_counts(rows: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples x rows) how often each row is drawn in each resample; seeded, the same for every metric."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, rows, size=(resamples, rows))
    offsets = (np.arange(resamples) * rows)[:, None]
    return np.bincount((picks + offsets).ravel(), minlength=resamples * rows).reshape(resamples, rows)


def compare(metric: Metric, base_stats: np.ndarray, ft_stats: np.ndarray, *, seed: int,
            resamples: int = DEFAULT_RESAMPLES, counts: Optional[np.ndarray] = None) -> Comparison:
    """Base vs fine-tuned on one metric; `counts` (from resample_counts) lets several metrics share one draw."""
    base_stats = np.asarray(base_stats, dtype=np.float64)
    ft_stats = np.asarray(ft_stats, dtype=np.float64)
    if base_stats.shape != ft_stats.shape or base_stats.ndim != 2 or not len(base_stats):
        raise ValueError(f"{metric.name}: base and fine-tuned need the same non-empty rows "
                         f"(got {base_stats.shape} and {ft_stats.shape})")
    rows = len(base_stats)
    if counts is None:
        counts = resample_counts(rows, resamples, seed)
    base_value, ft_value = metric.value(base_stats), metric.value(ft_stats)
    with np.errstate(invalid="ignore", over="ignore"):
        base_draws, ft_draws = metric.reduce(counts @ base_stats), metric.reduce(counts @ ft_stats)
        deltas = ft_draws - base_draws
        if np.array_equal(base_stats, ft_stats):
            deltas = np.zeros(len(counts))  # inf - inf would be nan; identical rows differ by exactly nothing
        low, high = _interval(deltas)
    delta = 0.0 if np.array_equal(base_stats, ft_stats) else ft_value - base_value
    # relative float noise: far below any difference a metric can show on real rows
    tolerance = NOISE * max(1.0, *(abs(v) for v in (base_value, ft_value) if np.isfinite(v)))
    return Comparison(metric.name, metric.label, metric.direction, base_value, ft_value, float(delta), low, high,
                      verdict(metric.direction, low, high, tolerance), rows, int(len(counts)),
                      _interval(base_draws), _interval(ft_draws))


def _interval(draws: np.ndarray) -> tuple:
    """The central 95% of the resampled values (NaN draws left out; NaN when none is left)."""
    finite = draws[~np.isnan(draws)]
    if not len(finite):
        return float("nan"), float("nan")
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)
