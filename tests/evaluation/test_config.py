"""The `evaluate:` config group and register.require_improvement: composed, typed, range-checked at start."""

import pytest

from runner.schema import ConfigError, validate
from tests.conftest import compose_cfg


def test_default_evaluate_section_composes_and_validates():
    cfg = compose_cfg()
    validate(cfg)
    assert cfg.evaluate.max_rows == 200 and cfg.evaluate.batch_size == 16 and cfg.evaluate.do_sample is False
    assert cfg.evaluate.seed == cfg.seed == 42  # follows the run's seed unless set
    assert cfg.evaluate.file is None and "rouge_l" in cfg.evaluate.metrics
    assert cfg.register.require_improvement is None
    assert cfg.steps.index("metrics") < cfg.steps.index("evaluate") < cfg.steps.index("register")  # the default workflow


@pytest.mark.parametrize("override, must_say", [
    ("evaluate.max_rows=0", "evaluate.max_rows=0 is out of range: must be > 0"),
    ("evaluate.batch_size=0", "evaluate.batch_size=0 is out of range: must be > 0"),
    ("evaluate.time_budget_s=-1", "evaluate.time_budget_s=-1.0 is out of range: must be >= 0"),
    ("evaluate.top_p=0", "evaluate.top_p=0.0 is out of range: must be in (0, 1]"),
    ("evaluate.resamples=10", "evaluate.resamples=10 is out of range: must be in [100, 1000000]"),
    ("evaluate.metrics=[loss,rogue_l]", "evaluate.metrics names 'rogue_l', not a metric (did you mean 'rouge_l'?)"),
    ("evaluate.metrics=[]", "evaluate.metrics is empty"),
    ("register.require_improvement=reply_length",
     "register.require_improvement='reply_length' is not a metric with a better direction"),
    ("register.require_improvement=rouge", "did you mean 'rouge_l'?"),
])
def test_bad_evaluate_settings_are_refused_naming_the_key(override, must_say):
    with pytest.raises(ConfigError) as info:
        validate(compose_cfg([override]))
    assert must_say in str(info.value)


def test_a_gate_metric_and_a_golden_file_are_accepted():
    cfg = compose_cfg(["register.require_improvement=rouge_l", "evaluate.file=/data/golden.jsonl",
                       "evaluate.metrics=[loss,rouge_l]", "evaluate.time_budget_s=0"])
    validate(cfg)
    assert cfg.register.require_improvement == "rouge_l" and cfg.evaluate.file == "/data/golden.jsonl"
