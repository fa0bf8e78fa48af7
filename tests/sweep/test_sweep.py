"""Multirun sweeps end to end: per-job runs, the summary, the best job registered, failed jobs marked."""

import csv
import os
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def ftrun_multirun(args, home, timeout=900):
    env = {**os.environ, "FTRUN_HOME": str(home), "HYDRA_FULL_ERROR": "1"}
    return subprocess.run([sys.executable, "-m", "runner.cli", "-m", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def read_summary(sweep_dir):
    with open(sweep_dir / "sweep_summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_local_2x2_sweep_registers_only_the_best_job(tmp_path, ftrun_home):
    sweep_dir = tmp_path / "sweep"
    proc = ftrun_multirun(
        ["finetune=lora", "finetune.learning_rate=3e-4,3e-3", "finetune.lora_r=4,8", "finetune.max_steps=6",
         "finetune.evaluation_strategy=steps", "finetune.eval_steps=3", "finetune.logging_steps=2",
         "finetune.local.max_eval_rows=16", f"hydra.sweep.dir={sweep_dir}"],
        ftrun_home,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    for job in jobs:
        assert (job / "resolved_config.yaml").exists() and (job / "run_record.json").exists()

    rows = read_summary(sweep_dir)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    losses = {int(r["job"]): float(r["eval_loss"]) for r in rows}
    best = [int(r["job"]) for r in rows if r["best"] == "*"]
    assert best == [min(losses, key=losses.get)]
    assert (sweep_dir / "sweep_summary.md").read_text().count("\n| ") == 4
    assert (sweep_dir / "sweep_eval_loss.png").stat().st_size > 1000

    from mlflow.tracking import MlflowClient

    tracking_uri = f"sqlite:///{ftrun_home}/mlflow.db"
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("chat_completion_tiny-phi3")
    runs = client.search_runs([experiment.experiment_id])
    swept = [r for r in runs if "sweep_id" in r.data.tags]
    assert len(swept) == 4
    assert len({r.data.tags["sweep_id"] for r in swept}) == 1
    combos = set()
    for r in swept:
        lr, rank = (kv.split("=")[1] for kv in r.data.tags["sweep_overrides"].split())
        combos.add((float(lr), int(rank)))
    assert combos == {(lr, r) for lr in (3e-4, 3e-3) for r in (4, 8)}
    versions = client.search_model_versions("name='tiny-phi3-sample'")  # named after the data used
    assert len(versions) == 1
    best_run = [r for r in swept if r.data.tags["sweep_job"] == str(best[0])][0]
    assert versions[0].run_id == best_run.info.run_id


def test_a_failed_job_is_marked_and_the_others_complete(tmp_path, ftrun_home):
    sweep_dir = tmp_path / "sweep"
    proc = ftrun_multirun(
        ["finetune.lr_scheduler_type=cosine,cosin", "finetune.max_steps=2", "finetune.evaluation_strategy=disable",
         "finetune.local.eval_before_training=false", "sweep.register_best=false", "steps=[model,data,finetune]",
         f"hydra.sweep.dir={sweep_dir}"],
        ftrun_home,
    )
    assert proc.returncode != 0  # the exit status says that some job failed
    rows = {int(r["job"]): r for r in read_summary(sweep_dir)}
    assert rows[0]["status"] == "ok"
    assert rows[1]["status"] == "failed" and "lr_scheduler_type" in rows[1]["error"]
    assert "1 sweep job(s) failed: [1]" in proc.stdout


def test_azure_dry_run_sweep_plans_differ_only_in_the_swept_value(tmp_path, ftrun_home):
    sweep_dir = tmp_path / "sweep"
    proc = ftrun_multirun(
        ["experiment=phi3_ultrachat", "dry_run=true", "finetune.learning_rate=1e-5,2e-5",
         f"hydra.sweep.dir={sweep_dir}"],
        ftrun_home, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = [yaml.safe_load((sweep_dir / n / "plan" / "pipeline_job.yaml").read_text()) for n in ("0", "1")]

    def diff(a, b, path=""):
        if isinstance(a, dict) and isinstance(b, dict):
            out = []
            for key in sorted(set(a) | set(b)):
                out += diff(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            return out
        return [] if a == b else [path]

    differences = diff(*jobs)
    assert differences, "the two plans are identical"
    assert all("learning_rate" in d or "display_name" in d for d in differences), differences
    assert any("learning_rate" in d for d in differences) and any("display_name" in d for d in differences)
    assert jobs[0]["display_name"].endswith("-learning_rate=1e-05")
    assert jobs[1]["display_name"].endswith("-learning_rate=2e-05")


def test_azure_sweep_without_waiting_submits_every_job_before_awaiting_any(tmp_path, monkeypatch):
    """backend.wait=false: each job submits and returns; the summary then waits for all of them and reads their
    metrics, so the jobs ran side by side instead of one after another."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from runner.azureml.backend import AzureMLBackend
    from runner.schema import SweepConfig
    from runner.sweep.summary import summarize_sweep
    from runner.workflow import run
    from tests.azureml.double import AzureWorld
    from tests.azureml.test_workflow import compose, earlier_run_with_data

    uri = (tmp_path / "mlruns").as_uri()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("workspace")
    job_names = []
    for final_eval in (0.9, 0.6):  # the Azure pipeline jobs, as the workspace's MLflow shows them
        parent = client.create_run(experiment)
        client.log_batch(parent.info.run_id, metrics=[Metric("loss", 1.0, 0, 1), Metric("eval_loss", 1.2, 0, 1),
                                                      Metric("eval_loss", final_eval, 0, 2)])
        job_names.append(parent.info.run_id)

    class World(AzureWorld):
        def answer(self, name, args, kwargs):
            if name == "workspace.jobs.create_or_update":
                self.job_name = job_names[len(self.find("workspace.jobs.create_or_update"))]
            result = super().answer(name, args, kwargs)
            if name == "workspace.jobs.stream":
                self.job_status = "Completed"
            return result

    world = World(tracking_uri=uri)
    world.job_status = "Running"
    data_run, _ = earlier_run_with_data(tmp_path)
    sweep_dir = tmp_path / "sweep"
    for num, lr in enumerate(("1e-05", "2e-05")):
        cfg, overrides = compose(tmp_path, "steps=[connect,model,compute,finetune,metrics]", "backend.wait=false",
                                 f"from_run={data_run}", f"finetune.learning_rate={lr}")
        sweep = {"id": "s1", "dir": str(sweep_dir), "job_num": num, "swept": {"finetune.learning_rate": lr}}
        record = run(cfg, run_dir=sweep_dir / str(num), task_overrides=overrides, sweep=sweep,
                     backend=AzureMLBackend(cfg, clients=world.clients()))
        assert record.data["deferred_steps"] == ["metrics"]
    names = world.names()
    assert names.count("workspace.jobs.create_or_update") == 2 and "workspace.jobs.stream" not in names

    summary = summarize_sweep(sweep_dir, OmegaConf.structured(SweepConfig), finish_best=False,
                              backend_factory=lambda cfg: AzureMLBackend(cfg, clients=world.clients()))
    names = world.names()
    assert names.count("workspace.jobs.stream") == 1  # the second job had completed by the time it was checked
    assert max(i for i, n in enumerate(names) if n == "workspace.jobs.create_or_update") < names.index(
        "workspace.jobs.stream")
    rows = {int(r["job"]): r for r in read_summary(sweep_dir)}
    assert [r["status"] for r in rows.values()] == ["ok", "ok"]
    assert float(rows[0]["eval_loss"]) == 0.9 and float(rows[1]["eval_loss"]) == 0.6
    assert summary["best_job"] == 1 and rows[1]["best"] == "*"
    assert (sweep_dir / "sweep_eval_loss.png").exists()


def test_optuna_search_preset_runs_its_trials(tmp_path, ftrun_home):
    """hparams_search=optuna_lr_rank: a seeded Optuna study over learning rate and LoRA rank (dry run: no metric,
    so every trial reports +inf, which Optuna accepts, where NaN would abort the study)."""
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "FTRUN_HOME": str(ftrun_home)}
    proc = subprocess.run([sys.executable, "-m", "runner.cli", "hparams_search=optuna_lr_rank",
                           "hydra.sweeper.n_trials=3", "dry_run=true", f"hydra.sweep.dir={sweep_dir}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"finetune.learning_rate", "finetune.lora_r"}
    assert 1e-4 <= results["best_params"]["finetune.learning_rate"] <= 1e-2
    plans = [yaml.safe_load((sweep_dir / str(n) / "plan" / "plan.yaml").read_text()) for n in range(3)]
    assert all(p["finetune"]["params"]["apply_lora"] is True for p in plans)
    assert all(p["finetune"]["params"]["lora_r"] in (4, 8, 16) for p in plans)
    assert all("-learning_rate=" in p["display_name"] and "-lora_r=" in p["display_name"] for p in plans)
    assert len(read_summary(sweep_dir)) == 3


def _job_dir(sweep_dir, num, eval_loss):
    import json

    job = sweep_dir / str(num)
    job.mkdir(parents=True)
    record = {"status": "ok", "overrides": [f"finetune.learning_rate={num}"],
              "steps": {"finetune": {"status": "ok", "outputs": {"eval_loss": eval_loss}}}}
    (job / "run_record.json").write_text(json.dumps(record))
    return job


def test_a_diverged_job_is_never_the_best_and_a_refused_best_job_fails_the_sweep(tmp_path, monkeypatch):
    """An infinite loss must not win (maximize would pick it); when the best job's model is refused at register
    (the quality gate), the summary is still written and says so, and the sweep's exit status is 1."""
    from runner.errors import RunnerError
    from runner.schema import SweepConfig
    from runner.sweep import summary as summary_mod
    from runner.sweep.callback import SweepSummary

    sweep_dir = tmp_path / "sweep"
    for num, loss in enumerate((float("inf"), 2.0, 1.0)):
        _job_dir(sweep_dir, num, loss)
    jobs = summary_mod.collect_jobs(sweep_dir)
    assert summary_mod.pick_best(jobs, "eval_loss", "maximize")["job"] == 1
    assert summary_mod.pick_best(jobs, "eval_loss", "minimize")["job"] == 2

    def refused(best, *args, **kwargs):
        raise RunnerError(f"quality gate: the model of job {best['job']} is not registered")

    monkeypatch.setattr(summary_mod, "finish_best_job", refused)
    result = summary_mod.summarize_sweep(sweep_dir, OmegaConf.structured(SweepConfig))
    assert result["best_job"] == 2 and "quality gate" in result["best_run"]["error"]
    assert (sweep_dir / "sweep_summary.md").exists()
    monkeypatch.setattr(summary_mod, "summarize_sweep", lambda *a, **k: result)
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}, "sweep": {}})
    with pytest.raises(SystemExit) as stop:
        SweepSummary().on_multirun_end(config)
    assert stop.value.code == 1
