"""The project's Optuna sweeper (hydra_plugins/ftrun_optuna_sweeper): Hydra's override grammar as Optuna search
spaces, and a search run end to end through the CLI whose trials are the runner's jobs."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from tests.conftest import REPO


def space(params, arguments=()):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_plugins.ftrun_optuna_sweeper._impl import search_space

    return search_space(params, arguments, OverridesParser.create())


def test_override_grammar_maps_to_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dims, fixed = space({
        "a": "tag(log, interval(1e-4, 1e-2))",
        "b": "choice(4, 8, 16)",
        "c": "interval(0.0, 0.5)",
        "d": "int(interval(1, 8))",
        "e": "range(2, 10, 2)",
        "f": "tag(log, int(interval(1, 1024)))",
        "g": "adamw,sgd",
        "h": "7",
    })
    assert dims["a"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert dims["b"] == CategoricalDistribution([4, 8, 16])
    assert dims["c"] == FloatDistribution(0.0, 0.5)
    assert dims["d"] == IntDistribution(1, 8)
    assert dims["e"] == IntDistribution(2, 8, step=2)  # stop excluded, as in Python's range
    assert dims["f"] == IntDistribution(1, 1024, log=True)
    assert dims["g"] == CategoricalDistribution(["adamw", "sgd"])
    assert "h" not in dims and fixed == ["h=7"]


def test_the_command_line_overrides_the_configured_search_space():
    from optuna.distributions import CategoricalDistribution

    dims, fixed = space({"finetune.lora_r": "choice(4, 8, 16)", "finetune.learning_rate": "interval(1e-4, 1e-2)"},
                        ["finetune.lora_r=32", "finetune.learning_rate=1e-3,2e-3", "finetune.max_steps=3"])
    assert "finetune.lora_r" not in dims and "finetune.lora_r=32" in fixed
    assert dims["finetune.learning_rate"] == CategoricalDistribution([1e-3, 2e-3])
    assert "finetune.max_steps=3" in fixed


def test_log_on_choices_is_refused():
    with pytest.raises(ValueError, match="log"):
        space({"a": "tag(log, choice(1, 10))"})


def test_the_preset_selects_this_sweeper_with_its_search_space():
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="test"):
        cfg = compose(config_name="config", overrides=["hparams_search=optuna_lr_rank", "sweep.direction=maximize"],
                      return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.ftrun_optuna_sweeper.sweeper.FtrunOptunaSweeper"
    assert sweeper.direction == "maximize"  # follows sweep.direction
    assert dict(sweeper.params) == {"finetune.learning_rate": "tag(log, interval(1e-4, 1e-2))",
                                    "finetune.lora_r": "choice(4, 8, 16)"}
    assert sweeper.sampler.name == "tpe" and sweeper.sampler.seed == 42
    assert cfg.finetune.apply_lora is True


@pytest.mark.slow
def test_optuna_search_trains_its_trials_and_reads_back_their_objective(tmp_path, ftrun_home):
    """Three trials in batches of two (2 + 1), each a real tiny LoRA training: the study (kept in SQLite) holds three
    complete trials with distinct sampled values, each trial's value is the eval loss its own job measured, and each
    job trained with the values the study sampled for it."""
    import optuna

    sweep_dir = tmp_path / "sweep"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {**os.environ, "FTRUN_HOME": str(ftrun_home), "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "runner.cli", "hparams_search=optuna_lr_rank", "hydra.sweeper.n_trials=3",
         "hydra.sweeper.n_jobs=2", f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=e2e",
         "steps=[model,data,finetune]", "finetune.max_steps=2", "finetune.evaluation_strategy=steps",
         "finetune.eval_steps=2", "finetune.local.max_eval_rows=8", "sweep.register_best=false",
         f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    study = optuna.load_study(study_name="e2e", storage=storage)
    trials = study.get_trials()
    assert len(trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    rates = [t.params["finetune.learning_rate"] for t in trials]
    assert len(set(rates)) == 3 and all(1e-4 <= r <= 1e-2 for r in rates)
    assert all(t.params["finetune.lora_r"] in (4, 8, 16) for t in trials)

    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["n_trials"] == 3 and [t["job"] for t in results["trials"]] == [0, 1, 2]
    for trial, row in zip(trials, results["trials"]):
        job = sweep_dir / str(row["job"])
        record = json.loads((job / "run_record.json").read_text())
        eval_loss = record["steps"]["finetune"]["outputs"]["eval_loss"]
        assert math.isfinite(trial.value) and trial.value == pytest.approx(eval_loss, rel=1e-12)
        resolved = OmegaConf.load(job / "resolved_config.yaml")
        assert resolved.finetune.learning_rate == trial.params["finetune.learning_rate"]
        assert resolved.finetune.lora_r == trial.params["finetune.lora_r"] and resolved.finetune.apply_lora

    best = min(trials, key=lambda t: t.value)
    assert results["best_params"] == best.params and results["best_value"] == best.value
    with open(sweep_dir / "sweep_summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert [r["job"] for r in summary if r["best"] == "*"] == [str(results["best_job"])]
