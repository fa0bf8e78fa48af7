"""register.require_improvement's rule: refuse only a model whose interval lies wholly on the worse side."""

import pytest

from runner.errors import RunnerError
from runner.evaluation.gate import improvement_refusal
from runner.evaluation.metrics import RowOutput, resolve_metrics
from runner.evaluation.report import metrics_document
from runner.evaluation.results import EvalRow, evaluate_outputs


def _doc(base_replies, ft_replies):
    refs = [f"the answer is number {i}" for i in range(len(base_replies))]
    rows = [EvalRow(i, [{"role": "user", "content": "q"}], r) for i, r in enumerate(refs)]
    base = [RowOutput(reply=b(r), nll_sum=4.0, target_tokens=4, correct_tokens=2) for b, r in zip(base_replies, refs)]
    ft = [RowOutput(reply=f(r), nll_sum=4.0, target_tokens=4, correct_tokens=2) for f, r in zip(ft_replies, refs)]
    return metrics_document(evaluate_outputs(rows, base, ft, resolve_metrics(["rouge_l", "loss"]), seed=0,
                                             resamples=200))


def test_a_worse_model_is_refused_with_the_reason():
    doc = _doc([lambda r: r] * 20, [lambda r: "unrelated words"] * 20)
    reason = improvement_refusal(doc, "rouge_l")
    assert reason.startswith("evaluate: ROUGE-L is worse than the base model: 1 -> 0, change -1")
    assert "95% interval" in reason and "on 20 rows" in reason and "register.require_improvement=rouge_l" in reason


def test_better_or_unclear_models_pass_and_no_gate_passes():
    better = _doc([lambda r: "unrelated words"] * 20, [lambda r: r] * 20)
    same = _doc([lambda r: r] * 20, [lambda r: r] * 20)
    assert improvement_refusal(better, "rouge_l") is None
    assert improvement_refusal(same, "rouge_l") is None and improvement_refusal(same, "loss") is None
    assert improvement_refusal(_doc([lambda r: r] * 3, [lambda r: "x"] * 3), None) is None


def test_a_gate_on_a_metric_that_was_not_scored_is_a_clear_error():
    doc = _doc([lambda r: r] * 5, [lambda r: r] * 5)
    with pytest.raises(RunnerError, match="did not score bleu"):
        improvement_refusal(doc, "bleu")
    with pytest.raises(RunnerError, match="not a metric with a better direction"):
        improvement_refusal(doc, "reply_length")
