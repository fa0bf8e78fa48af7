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
