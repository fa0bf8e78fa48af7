"""Evaluation metrics against values worked out by hand, and the paired bootstrap's honesty."""

import math

import numpy as np
import pytest

from runner.errors import RunnerError
from runner.evaluation.metrics import (METRICS, RowOutput, exact_match, normalise_answer, resolve_metrics,
                                       rouge_l_f, teacher_forced_summary)
from runner.evaluation.stats import BETTER, UNCLEAR, WORSE, compare, resample_counts, verdict


def _stats(name, replies, references, **fields):
    outputs = [RowOutput(reply=r, **{k: v[i] for k, v in fields.items()}) for i, r in enumerate(replies)]
    return METRICS[name].stats(outputs, references)


# ---- values by hand --------------------------------------------------------------------------------------------

def test_corpus_bleu_by_hand():
    # hyp "the cat sat on the mat" vs ref "the cat sat on a mat" (6 words each, so brevity penalty 1):
    #   1-grams: the(2, clipped to 1) cat sat on mat -> 5/6;   2-grams: the cat, cat sat, sat on -> 3/5
    #   3-grams: the cat sat, cat sat on -> 2/4;               4-grams: the cat sat on -> 1/3
    #   BLEU = 100 * (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = 100 * (1/12) ** 0.25 = 53.7285
    stats = _stats("bleu", ["the cat sat on the mat"], ["the cat sat on a mat"])
    assert METRICS["bleu"].value(stats) == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-6)
    assert METRICS["bleu"].value(stats) == pytest.approx(53.7285, abs=1e-4)
    # identical -> 100; nothing in common -> 0
    assert METRICS["bleu"].value(_stats("bleu", ["a b c d e"], ["a b c d e"])) == pytest.approx(100.0)
    assert METRICS["bleu"].value(_stats("bleu", ["x y z w"], ["a b c d"])) == 0.0


def test_corpus_bleu_sums_statistics_not_sentence_scores():
    # two rows: the same pair twice has the same corpus BLEU as once (statistics double, ratios stay)
    once = _stats("bleu", ["the cat sat on the mat"], ["the cat sat on a mat"])
    twice = _stats("bleu", ["the cat sat on the mat"] * 2, ["the cat sat on a mat"] * 2)
    assert METRICS["bleu"].value(twice) == pytest.approx(METRICS["bleu"].value(once))


def test_chrf_by_hand():
    # chrF (character 1..6-grams, whitespace dropped, beta 2), hyp "ab" vs ref "abc":
    #   1-grams hyp {a,b} ref {a,b,c}: P = 2/2, R = 2/3;   2-grams hyp {ab} ref {ab,bc}: P = 1/1, R = 1/2
    #   3..6-grams: the hypothesis has none, so those orders are left out of the averages
    #   mean P = 1, mean R = (2/3 + 1/2) / 2 = 7/12;  F2 = (1 + 4) P R / (4 P + R) = (35/12) / (55/12) = 7/11
    value = METRICS["chrf"].value(_stats("chrf", ["ab"], ["abc"]))
    assert value == pytest.approx(100 * 7 / 11, abs=1e-6)
    assert METRICS["chrf"].value(_stats("chrf", ["same words"], ["same words"])) == pytest.approx(100.0)


def test_rouge_l_by_hand():
    # words of the reply "the cat sat" all appear in order in "the cat sat on the mat": LCS = 3
    #   P = 3/3, R = 3/6, F = 2 P R / (P + R) = 1 / 1.5 = 2/3
    assert rouge_l_f("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    # "the cat sat on the mat" vs "the cat sat on a mat": LCS "the cat sat on mat" = 5 of 6 each side -> 5/6
    assert rouge_l_f("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(5 / 6)
    # case and punctuation do not count; other scripts are words too (rouge-score's default would say 0)
    assert rouge_l_f("The CAT, sat!", "the cat sat") == pytest.approx(1.0)
    assert rouge_l_f("Привет мир", "привет мир") == pytest.approx(1.0)
    assert rouge_l_f("dog", "cat") == 0.0
    # the metric is the mean of the per-row F values
    stats = _stats("rouge_l", ["the cat sat", "dog"], ["the cat sat on the mat", "cat"])
    assert METRICS["rouge_l"].value(stats) == pytest.approx((2 / 3 + 0) / 2)


def test_exact_match_normalisation():
    assert normalise_answer("  The Cat,  sat!\n") == "cat sat"
    assert exact_match("The cat, sat!", "cat sat") == 1.0
    assert exact_match("an apple", "Apple.") == 1.0
    assert exact_match("cats sat", "cat sat") == 0.0
    assert exact_match("Paris", "Paris is the capital") == 0.0
    stats = _stats("exact_match", ["Paris.", "Rome", "x"], ["paris", "Madrid", "X!"])
    assert METRICS["exact_match"].value(stats) == pytest.approx(2 / 3)


def test_teacher_forced_aggregates_are_token_weighted():
    rows = [RowOutput(nll_sum=2.0, target_tokens=1, correct_tokens=0),
            RowOutput(nll_sum=3.0, target_tokens=4, correct_tokens=3)]
    summary = teacher_forced_summary(rows)
    # (2 + 3) / (1 + 4) = 1.0, not the mean of the rows' losses (2.0 and 0.75)
    assert summary["loss"] == pytest.approx(1.0)
    assert summary["perplexity"] == pytest.approx(math.e)
    assert summary["token_accuracy"] == pytest.approx(3 / 5)
    assert METRICS["loss"].value(METRICS["loss"].stats(rows, ["", ""])) == pytest.approx(1.0)
    assert METRICS["perplexity"].value(METRICS["perplexity"].stats(rows, ["", ""])) == pytest.approx(math.e)
    assert METRICS["token_accuracy"].value(METRICS["token_accuracy"].stats(rows, ["", ""])) == pytest.approx(0.6)


def test_reply_length_and_stop_rate():
    outputs = [RowOutput(reply="a", reply_tokens=4, stopped=True), RowOutput(reply="b", reply_tokens=8, stopped=False)]
    assert METRICS["reply_length"].value(METRICS["reply_length"].stats(outputs, ["", ""])) == 6.0
    assert METRICS["stop_rate"].value(METRICS["stop_rate"].stats(outputs, ["", ""])) == 0.5


def test_per_row_bleu_is_sentence_bleu():
    outputs = [RowOutput(reply="the cat sat on the mat"), RowOutput(reply="x")]
    refs = ["the cat sat on a mat", "y"]
    values = METRICS["bleu"].row_values(outputs, refs, METRICS["bleu"].stats(outputs, refs))
    assert values[0] == pytest.approx(53.7285, abs=1e-4) and values[1] == 0.0


def test_unknown_metric_name_is_a_clear_error():
    with pytest.raises(RunnerError, match=r"unknown metric\(s\) 'rouge' \(did you mean 'rouge_l'\?\).*known metrics"):
        resolve_metrics(["loss", "rouge"])
    with pytest.raises(RunnerError, match="empty"):
        resolve_metrics([])
    with pytest.raises(RunnerError, match="more than once"):
        resolve_metrics(["bleu", "bleu"])
    assert [m.name for m in resolve_metrics(["bleu", "loss"])] == ["bleu", "loss"]


def test_missing_inputs_are_refused():
    with pytest.raises(RunnerError, match="needs reply"):
        METRICS["rouge_l"].stats([RowOutput(nll_sum=1.0, target_tokens=1)], ["x"])


# ---- the bootstrap ---------------------------------------------------------------------------------------------

def test_resample_counts_are_seeded_and_sum_to_rows():
    a, b = resample_counts(7, 50, seed=3), resample_counts(7, 50, seed=3)
    assert np.array_equal(a, b) and a.shape == (50, 7) and (a.sum(axis=1) == 7).all()
    assert not np.array_equal(a, resample_counts(7, 50, seed=4))


def test_identical_models_get_no_clear_difference_on_every_metric():
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
    refs = [" ".join(rng.choice(words, 6)) for _ in range(30)]
    outputs = [RowOutput(reply=" ".join(rng.choice(words, 5)), stopped=bool(i % 2), reply_tokens=int(i % 7 + 1),
                         nll_sum=float(rng.uniform(1, 9)), target_tokens=int(rng.integers(1, 9)),
                         correct_tokens=0) for i in range(30)]
    for o in outputs:
        o.correct_tokens = int(rng.integers(0, o.target_tokens + 1))
    for metric in METRICS.values():
        stats = metric.stats(outputs, refs)
        result = compare(metric, stats, stats.copy(), seed=1, resamples=300)
        assert result.verdict == UNCLEAR, (metric.name, result)
        assert result.ci_low <= 0 <= result.ci_high and result.delta == 0.0
        assert result.base == result.ft


def test_clearly_better_and_worse_respect_direction():
    refs = [f"answer number {i} is here" for i in range(40)]
    good = [RowOutput(reply=r, nll_sum=5.0, target_tokens=5, correct_tokens=5) for r in refs]
    bad = [RowOutput(reply="nothing like it", nll_sum=40.0, target_tokens=5, correct_tokens=1) for _ in refs]
    for name in ("rouge_l", "bleu", "chrf", "exact_match", "token_accuracy", "loss", "perplexity"):
        metric = METRICS[name]
        up = compare(metric, metric.stats(bad, refs), metric.stats(good, refs), seed=0, resamples=200)
        down = compare(metric, metric.stats(good, refs), metric.stats(bad, refs), seed=0, resamples=200)
        assert up.verdict == BETTER and down.verdict == WORSE, (name, up, down)
        if metric.direction > 0:
            assert up.delta > 0 and up.ci_low > 0
        else:  # lower is better: the fine-tuned loss went down
            assert up.delta < 0 and up.ci_high < 0


def test_noisy_small_difference_is_not_called():
    # half the rows improve, half regress by the same amount: the interval straddles 0
    refs = ["a b c d"] * 20
    base = [RowOutput(reply="a b c d" if i % 2 else "x y") for i in range(20)]
    ft = [RowOutput(reply="x y" if i % 2 else "a b c d") for i in range(20)]
    metric = METRICS["rouge_l"]
    result = compare(metric, metric.stats(base, refs), metric.stats(ft, refs), seed=0, resamples=500)
    assert result.verdict == UNCLEAR and result.ci_low < 0 < result.ci_high


def test_verdict_words():
    assert verdict(1, 0.1, 0.2) == BETTER and verdict(1, -0.2, -0.1) == WORSE
    assert verdict(-1, 0.1, 0.2) == WORSE and verdict(-1, -0.2, -0.1) == BETTER
    assert verdict(1, -0.1, 0.1) == UNCLEAR and verdict(1, 0.0, 0.0) == UNCLEAR
    assert verdict(0, 1.0, 2.0) == "higher" and verdict(0, -2.0, -1.0) == "lower"
    assert verdict(1, float("nan"), float("nan")) == UNCLEAR


def test_float_noise_is_not_a_difference():
    # a merged model whose loss differs from the base's only in the 9th digit on every row is not `better`
    base = [RowOutput(nll_sum=10.0, target_tokens=5, correct_tokens=1) for _ in range(20)]
    ft = [RowOutput(nll_sum=10.0 - 1e-8, target_tokens=5, correct_tokens=1) for _ in range(20)]
    metric = METRICS["loss"]
    result = compare(metric, metric.stats(base, [""] * 20), metric.stats(ft, [""] * 20), seed=0, resamples=100)
    assert result.ci_high < 0 and result.verdict == UNCLEAR


def test_the_light_name_list_matches_the_registry():
    from runner.evaluation.names import METRIC_DIRECTIONS

    assert METRIC_DIRECTIONS == {name: m.direction for name, m in METRICS.items()}
