"""`register.require_improvement=<metric>`: the evaluation's part of the quality gate before register.

A model is refused when its 95% interval for the metric lies wholly on the worse side of 0 (verdict `worse`), and
only then: `no clear difference` passes (a gate on "significantly better" would refuse most honest small-data
fine-tunes; the verdict table says how sure the improvement is). The register step records the reason as it does
for its other gate rules.
"""

from typing import Any, Mapping, Optional

from runner.errors import RunnerError
from runner.evaluation.names import RANKABLE_METRICS


def improvement_refusal(metrics_doc: Mapping[str, Any], metric: Optional[str]) -> Optional[str]:
    """Why the model must not be registered (None: it may). `metrics_doc` is metrics.json's content."""
    if metric is None:
        return None
    if metric not in RANKABLE_METRICS:
        raise RunnerError(f"register.require_improvement={metric!r} is not a metric with a better direction "
                          f"({', '.join(RANKABLE_METRICS)})")
    result = (metrics_doc.get("metrics") or {}).get(metric)
    if result is None:
        raise RunnerError(f"register.require_improvement={metric} but the evaluation did not score {metric} "
                          f"(evaluate.metrics={list((metrics_doc.get('metrics') or {}))}); add it to evaluate.metrics")
    if result["verdict"] != "worse":
        return None
    return (f"evaluate: {result['label']} is worse than the base model: {result['base']:.4g} -> {result['ft']:.4g}, "
            f"change {result['delta']:+.4g} with 95% interval {result['ci_low']:+.4g}..{result['ci_high']:+.4g} "
            f"on {result['rows']} rows (register.require_improvement={metric})")
