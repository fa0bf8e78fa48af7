"""The evaluate step wired into the workflow (no model trained here): its typed result, the register gate on its
verdict, the version's tags, sweeps ranked by an evaluate metric, the figures rebuilt from logged metrics, and the
config checks that come with it."""

import json

import pytest

from runner.record import RunRecord, final_figure
from runner.schema import ConfigError, validate
from runner.steps.context import StepContext
from runner.steps.evaluate import EvaluateResult, result_from_document, verdict_tags
from runner.steps.register import RegisterRefused, quality_gate
from tests.conftest import compose_cfg


def _document(rouge_verdict="worse", loss_verdict="better"):
    """metrics.json's content for two metrics, as runner.evaluation.report.metrics_document writes it."""
    from runner.evaluation.metrics import RowOutput, resolve_metrics
    from runner.evaluation.report import metrics_document
    from runner.evaluation.results import EvalRow, evaluate_outputs

    refs = [f"the answer is number {i}" for i in range(20)]
    rows = [EvalRow(i, [{"role": "user", "content": "q"}], r) for i, r in enumerate(refs)]
    good = {"better": lambda r: r, "worse": lambda r: "unrelated words"}[rouge_verdict]
    base = [RowOutput(reply="unrelated words" if rouge_verdict == "better" else r, nll_sum=8.0, target_tokens=4,
                      correct_tokens=1) for r in refs]
    ft = [RowOutput(reply=good(r), nll_sum=4.0 if loss_verdict == "better" else 8.0 + (i % 3) * 0.1,
                    target_tokens=4, correct_tokens=2) for i, r in enumerate(refs)]
    return metrics_document(evaluate_outputs(rows, base, ft, resolve_metrics(["rouge_l", "loss"]), seed=0,
                                             resamples=200))


def _ctx(tmp_path, overrides=(), evaluate=None):
    cfg = compose_cfg(["steps=[evaluate,register]", *overrides])
    record = RunRecord(tmp_path, backend="local", config_sha256="x")
    record.data["steps"]["finetune"] = {"status": "ok", "outputs": {"global_step": 12, "eval_loss": 1.0}}
    if evaluate is not None:
        record.data["steps"]["evaluate"] = {"status": "ok", "outputs": evaluate.to_outputs()}
    return StepContext(cfg=cfg, run_dir=tmp_path, record=record)


class _Backend:
    def training_params(self, ctx):
        return {"max_steps": "12", "warmup_steps": "0", "lr_scheduler_type": "linear"}


def test_the_result_holds_the_figures_and_round_trips_through_the_record():
    result = result_from_document(_document(), {"metrics_json": "/x/metrics.json"}, "/data/test.jsonl")
    assert result.verdicts == {"rouge_l": "worse", "loss": "better"} and result.rows == 20
    assert result.figures["rouge_l"]["ft"] < result.figures["rouge_l"]["base"]
    assert result.figures["rouge_l"]["label"] == "ROUGE-L" and len(result.summary) == 2
    again = EvaluateResult.from_outputs(json.loads(json.dumps(result.to_outputs())))
    assert again == result and again.ft_value("loss") == pytest.approx(1.0)


def test_the_version_tags_carry_every_verdict_and_the_primary_line():
    tags = verdict_tags(result_from_document(_document(), {}, "f"))
    assert tags["eval_verdict"] == "rouge_l: worse" and tags["eval_verdict_loss"] == "better"
    assert tags["eval_summary"].startswith("ROUGE-L 1.000 -> 0.000") and tags["eval_summary"].endswith("worse")
    assert verdict_tags(None) == {} and verdict_tags(EvaluateResult()) == {}


def test_require_improvement_refuses_a_worse_model_with_the_reason(tmp_path):
    worse = result_from_document(_document("worse"), {}, "f")
    ctx = _ctx(tmp_path, ["register.require_improvement=rouge_l"], worse)
    with pytest.raises(RegisterRefused, match=r"ROUGE-L is worse than the base model: 1 -> 0.*"
                                              r"register.require_improvement=rouge_l"):
        quality_gate(ctx, _Backend())
    # the same verdict on loss (better) passes, as does no gate at all
    assert quality_gate(_ctx(tmp_path, ["register.require_improvement=loss"], worse), _Backend()) == "passed"
    assert quality_gate(_ctx(tmp_path, [], worse), _Backend()) == "passed"


def test_require_improvement_passes_better_and_unclear_and_refuses_without_an_evaluation(tmp_path):
    better = result_from_document(_document("better"), {}, "f")
    assert quality_gate(_ctx(tmp_path, ["register.require_improvement=rouge_l"], better), _Backend()) == "passed"
    with pytest.raises(RegisterRefused, match="needs the evaluate step's verdicts"):
        quality_gate(_ctx(tmp_path, ["register.require_improvement=rouge_l"]), _Backend())


def test_the_figures_rebuilt_from_logged_metrics_give_the_same_verdicts():
    """What the Azure evaluate job logs to MLflow is enough to rebuild the step's figures and verdicts."""
    from runner.evaluation.from_metrics import document_from_metrics

    doc = _document()
    rebuilt = document_from_metrics({**doc["mlflow"], "eval_rows": doc["rows"]}, ["rouge_l", "loss"])
    assert rebuilt["verdicts"] == doc["verdicts"] and rebuilt["rows"] == 20
    assert rebuilt["summary"] == doc["summary"] and rebuilt["primary_metric"] == "rouge_l"
    with pytest.raises(Exception, match="logged no eval_base_/eval_ft_ figures for \\['bleu'\\]"):
        document_from_metrics(doc["mlflow"], ["bleu"])


def _sweep_job(sweep_dir, num, rouge, eval_loss):
    job = sweep_dir / str(num)
    job.mkdir(parents=True)
    record = {"status": "ok", "sweep": {"swept": {"finetune.learning_rate": num}}, "steps": {
        "finetune": {"status": "ok", "seconds": 1, "outputs": {"eval_loss": eval_loss, "mlflow_run_id": f"r{num}"}},
        "evaluate": {"status": "ok", "seconds": 1, "outputs": {"figures": {"rouge_l": {"base": 0.1, "ft": rouge}}}}}}
    (job / "run_record.json").write_text(json.dumps(record))


def test_a_sweep_ranks_by_an_evaluate_metric_and_picks_its_best(tmp_path):
    from omegaconf import OmegaConf

    from runner.schema import SweepConfig
    from runner.sweep.summary import summarize_sweep

    for num, rouge, loss in ((0, 0.30, 0.5), (1, 0.70, 0.9), (2, 0.50, 0.4)):  # eval_loss would pick job 2
        _sweep_job(tmp_path, num, rouge, loss)
    sweep = OmegaConf.structured(SweepConfig(metric="rouge_l", direction="maximize"))
    summary = summarize_sweep(tmp_path, sweep, finish_best=False)
    assert summary["best_job"] == 1
    table = (tmp_path / "sweep_summary.md").read_text().splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert "rouge_l" in header and "rank" in header
    ranks = {row.split("|")[1].strip(): row.split("|")[header.index("rank") + 1].strip() for row in table[2:]}
    assert ranks == {"0": "3", "1": "1", "2": "2"}
    assert final_figure(json.loads((tmp_path / "1" / "run_record.json").read_text()), "rouge_l") == 0.70


@pytest.mark.parametrize("overrides, must_say", [
    (["steps=[finetune,register]", "register.require_improvement=rouge_l"], "add evaluate to steps"),
    (["sweep.metric=rouge_l"], "sweep.metric=rouge_l is higher is better: set sweep.direction=maximize"),
    (["sweep.metric=rouge_l", "sweep.direction=maximize"], "add evaluate to sweep.job_steps"),
    (["sweep.metric=rogue"], "sweep.metric='rogue' is neither a fine-tune figure"),
    (["sweep.metric=bleu", "sweep.direction=maximize", "sweep.job_steps=[finetune,evaluate]",
      "evaluate.metrics=[rouge_l]"], "sweep.metric=bleu is not in evaluate.metrics"),
    (["test.rows=-1"], "test.rows=-1 is out of range"),
])
def test_config_checks_that_come_with_the_step(overrides, must_say):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg(overrides))
    assert must_say in str(info.value)


def test_an_evaluate_sweep_metric_and_test_rows_are_accepted():
    cfg = compose_cfg(["sweep.metric=rouge_l", "sweep.direction=maximize", "test.rows=8",
                       "sweep.job_steps=[connect,model,compute,data,finetune,metrics,evaluate]"])
    validate(cfg)
    assert cfg.test.rows == 8


def test_a_missing_fine_tuned_model_is_a_clear_error_before_any_model_loads(tmp_path):
    from runner.errors import MissingInput
    from runner.steps.evaluate import evaluation_input

    ctx = _ctx(tmp_path)
    ctx.record.data["steps"].pop("finetune")
    with pytest.raises(MissingInput, match="needs a fine-tuned model"):
        evaluation_input(ctx)
