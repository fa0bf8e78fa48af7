"""An evaluation's result rebuilt from the metrics it logged (`eval_base_<m>`, `eval_ft_<m>`, `eval_delta_<m>`,
`eval_delta_ci_low_<m>`, `eval_delta_ci_high_<m>`, `eval_rows`): what a backend that evaluated elsewhere (an Azure
ML command job logging to the workspace's MLflow) reads back. The verdict is recomputed from the interval by the
same rule the evaluator used (runner/evaluation/stats.py), so it cannot drift from the figures."""

from typing import Any, Dict, Mapping, Optional, Sequence

from runner.errors import RunnerError
from runner.evaluation.names import METRIC_DIRECTIONS


def document_from_metrics(values: Mapping[str, float], metrics: Sequence[str],
                          primary: Optional[str] = None) -> Dict[str, Any]:
    """metrics.json's content (the parts the evaluate step reads) from the logged values."""
    from runner.evaluation.metrics import METRICS
    from runner.evaluation.report import summary_line
    from runner.evaluation.results import primary_metric
    from runner.evaluation.stats import NOISE, Comparison, verdict

    rows = int(values.get("eval_rows") or 0)
    missing = [m for m in metrics if f"eval_ft_{m}" not in values or f"eval_base_{m}" not in values]
    if missing:
        raise RunnerError(f"the evaluation logged no eval_base_/eval_ft_ figures for {missing} (logged: "
                          f"{sorted(k for k in values if k.startswith('eval_'))[:12]})")
    out: Dict[str, Any] = {"rows": rows, "metrics": {}, "verdicts": {}, "summary": []}
    for name in metrics:
        base, ft = values[f"eval_base_{name}"], values[f"eval_ft_{name}"]
        low = values.get(f"eval_delta_ci_low_{name}", float("nan"))
        high = values.get(f"eval_delta_ci_high_{name}", float("nan"))
        tolerance = NOISE * max(1.0, *(abs(v) for v in (base, ft) if v == v and abs(v) != float("inf")))
        c = Comparison(metric=name, label=METRICS[name].label, direction=METRIC_DIRECTIONS[name], base=base, ft=ft,
                       delta=values.get(f"eval_delta_{name}", ft - base), ci_low=low, ci_high=high,
                       verdict=verdict(METRIC_DIRECTIONS[name], low, high, tolerance), rows=rows, resamples=0)
        out["metrics"][name] = c.to_dict()
        out["verdicts"][name] = c.verdict
        out["summary"].append(summary_line(c, METRICS[name].digits, max(len(METRICS[m].label) for m in metrics)))
    out["primary_metric"] = primary or primary_metric([METRICS[m] for m in metrics])
    return out
