"""The evaluation metrics' names and which way is better, without importing numpy or the metric packages: the
config schema checks `evaluate.metrics` and `register.require_improvement` against these when a run starts.
runner/evaluation/metrics.py defines the metrics themselves (a test holds the two in step)."""

# name -> 1 higher is better, -1 lower is better, 0 neither (descriptive)
METRIC_DIRECTIONS = {
    "loss": -1,
    "perplexity": -1,
    "token_accuracy": 1,
    "rouge_l": 1,
    "bleu": 1,
    "chrf": 1,
    "exact_match": 1,
    "reply_length": 0,
    "stop_rate": 1,
}
METRIC_NAMES = list(METRIC_DIRECTIONS)
# metrics a quality gate or a sweep may rank by: those with a better direction
RANKABLE_METRICS = [name for name, direction in METRIC_DIRECTIONS.items() if direction]
# the run's figures a sweep may rank by besides these (the finetune step's own, runner/record.py final_figure)
FINETUNE_FIGURES = ("eval_loss", "train_loss", "perplexity", "eval_loss_before", "tokens_per_s")


def _did_you_mean(name, known) -> str:
    import difflib

    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"


def evaluate_config_errors(cfg) -> list:
    """Metric names are checked when the run starts (validate()), not when the evaluation reaches them."""
    errors = []
    for name in cfg.evaluate.metrics:
        if name not in METRIC_NAMES:
            errors.append(f"evaluate.metrics names {name!r}, not a metric ({_did_you_mean(name, METRIC_NAMES)})")
    if not cfg.evaluate.metrics:
        errors.append(f"evaluate.metrics is empty: name at least one of {', '.join(METRIC_NAMES)}")
    gate = cfg.register.require_improvement
    if gate is not None and gate not in RANKABLE_METRICS:
        errors.append(f"register.require_improvement={gate!r} is not a metric with a better direction "
                      f"({_did_you_mean(gate, RANKABLE_METRICS)})")
    steps = set(cfg.steps)
    if gate is not None and "register" in steps and "evaluate" not in steps and not cfg.from_run:
        errors.append(f"register.require_improvement={gate} judges by the evaluate step: add evaluate to steps (or "
                      f"from_run= a run that evaluated)")
    metric = cfg.sweep.metric
    if metric not in FINETUNE_FIGURES and metric not in RANKABLE_METRICS:
        errors.append(f"sweep.metric={metric!r} is neither a fine-tune figure ({', '.join(FINETUNE_FIGURES)}) nor an "
                      f"evaluate metric with a direction ({_did_you_mean(metric, RANKABLE_METRICS)})")
    elif metric in RANKABLE_METRICS and "evaluate" not in cfg.sweep.job_steps:
        errors.append(f"sweep.metric={metric} is an evaluate metric: add evaluate to sweep.job_steps")
    if metric in RANKABLE_METRICS and metric not in cfg.evaluate.metrics:
        errors.append(f"sweep.metric={metric} is not in evaluate.metrics={list(cfg.evaluate.metrics)}")
    direction = METRIC_DIRECTIONS.get(metric)
    if direction and cfg.sweep.direction != ("maximize" if direction > 0 else "minimize"):
        errors.append(f"sweep.metric={metric} is {'higher' if direction > 0 else 'lower'} is better: set "
                      f"sweep.direction={'maximize' if direction > 0 else 'minimize'}")
    return errors
