"""After a sweep: one table of every job, each with its place by `sweep.metric` (a fine-tune figure or an evaluate
metric such as rouge_l), the best job marked, a picture of their eval-loss curves, and the best job's model
registered (and, if asked, deployed and tested).

Everything is read back from what the jobs left in their run directories (run_record.json, resolved_config.yaml)
and from MLflow, so the summary can be rebuilt for any sweep directory: `python -m runner.sweep.summary DIR`.
"""

import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf

from runner.atomic import save_figure, write_text
from runner.errors import RunnerError
from runner.record import RECORD_FILE, final_figure

COLUMNS = ["job", "overrides", "status", "train_loss", "eval_loss", "perplexity", "tokens_per_s", "wall_s",
           "best", "error"]


def _job_overrides(job_dir: Path, record: Dict[str, Any]) -> str:
    swept = (record.get("sweep") or {}).get("swept")
    if swept:
        return " ".join(f"{k}={v}" for k, v in sorted(swept.items()))
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    if overrides_file.exists():
        return " ".join(OmegaConf.load(overrides_file))
    return " ".join(record.get("overrides", []))


def _figure(record: Dict[str, Any], name: str) -> Optional[float]:
    return final_figure(record, name)


def _finite(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(value)


def job_config(job_dir: Path, **changes):
    """A job's resolved config back as a typed config, with `changes` applied (e.g. other steps)."""
    from runner.schema import RunConfig

    cfg = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(Path(job_dir) / "resolved_config.yaml"))
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def complete_deferred_jobs(sweep_dir, backend_factory=None) -> List[int]:
    """Jobs that submitted their training without waiting (Azure, backend.wait=false) deferred their later steps.
    All of them were submitted before any is awaited, so they ran side by side; now each is waited for and its
    metrics are read, in a run of its own under `<job>/collected/`."""
    from runner.workflow import run

    done = []
    for job_dir in sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()),
                          key=lambda p: int(p.name)):
        path = job_dir / RECORD_FILE
        record = json.loads(path.read_text()) if path.exists() else {}
        deferred = record.get("deferred_steps")
        if not deferred or (job_dir / "collected" / RECORD_FILE).exists():
            continue
        cfg = job_config(job_dir, steps=[s for s in deferred if s in ("metrics", "evaluate")], from_run=str(job_dir),
                         dry_run=False, **{"backend.wait": True})
        print(f"\ncollecting job {job_dir.name} ({record['steps']['finetune']['outputs'].get('job_name')})")
        try:
            run(cfg, run_dir=job_dir / "collected", backend=backend_factory(cfg) if backend_factory else None)
        except Exception as exc:  # reported in the summary as that job's failure
            print(f"job {job_dir.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        done.append(int(job_dir.name))
    return done


def _merged_record(job_dir: Path) -> Dict[str, Any]:
    """The job's record, completed by what was collected after the sweep (if anything was deferred)."""
    path = job_dir / RECORD_FILE
    if not path.exists():
        return {"status": "failed", "steps": {}, "error": {"message": "no run record"}}
    record = json.loads(path.read_text())
    collected = job_dir / "collected" / RECORD_FILE
    if record.get("deferred_steps") and collected.exists():
        later = json.loads(collected.read_text())
        record["steps"] = {**record["steps"], **later.get("steps", {})}
        record["status"] = later.get("status", record["status"])
        if later.get("error"):
            record["error"] = later["error"]
    return record


def collect_jobs(sweep_dir) -> List[Dict[str, Any]]:
    jobs = []
    for job_dir in sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()),
                          key=lambda p: int(p.name)):
        record = _merged_record(job_dir)
        resolved = job_dir / "resolved_config.yaml"
        tracking_uri = OmegaConf.load(resolved).mlflow.tracking_uri if resolved.exists() else None
        finetune = (record.get("steps", {}).get("finetune") or {}).get("outputs") or {}
        wall = sum(float(e.get("seconds", 0)) for e in record.get("steps", {}).values())
        jobs.append({
            "job": int(job_dir.name),
            "dir": str(job_dir),
            "overrides": _job_overrides(job_dir, record),
            "status": "ok" if record.get("status") == "ok" else "failed",
            "error": (record.get("error") or {}).get("message", ""),
            "train_loss": _figure(record, "train_loss"),
            "eval_loss": _figure(record, "eval_loss"),
            "perplexity": _figure(record, "perplexity"),
            "tokens_per_s": _figure(record, "tokens_per_s"),
            "wall_s": round(wall, 1),
            "mlflow_run_id": finetune.get("mlflow_run_id"),
            "tracking_uri": tracking_uri,
            "record": record,
        })
    return jobs


def pick_best(jobs: List[Dict[str, Any]], metric: str, direction: str) -> Optional[Dict[str, Any]]:
    """The job with the best finite figure. A diverged job is never the best (final_figure already reads NaN as
    missing; an infinite loss would win a `maximize` sweep), and the quality gate would refuse to register it."""
    scored = [j for j in jobs if j["status"] == "ok" and _finite(_figure(j["record"], metric))]
    if not scored:
        return None
    pick = min if direction == "minimize" else max
    return pick(scored, key=lambda j: _figure(j["record"], metric))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def ranks(jobs: List[Dict[str, Any]], metric: str, direction: str) -> Dict[int, int]:
    """job number -> its place by the sweep metric (1 = best), for the jobs that have a finite figure."""
    scored = [j for j in jobs if j["status"] == "ok" and _finite(_figure(j["record"], metric))]
    scored.sort(key=lambda j: _figure(j["record"], metric), reverse=direction == "maximize")
    return {j["job"]: place for place, j in enumerate(scored, 1)}


def tables(jobs: List[Dict[str, Any]], best: Optional[Dict[str, Any]], metric: str = "eval_loss",
           direction: str = "minimize") -> tuple[str, str]:
    """The jobs in job order, each with its place by the sweep metric (`rank`); a metric that is not one of the
    fixed columns (an evaluate metric: rouge_l, ...) gets a column of its own."""
    columns = COLUMNS if metric in COLUMNS else COLUMNS[:-3] + [metric] + COLUMNS[-3:]
    columns = columns[:-2] + ["rank"] + columns[-2:]
    places = ranks(jobs, metric, direction)
    rows = [{**j, metric: _figure(j["record"], metric), "rank": places.get(j["job"]),
             "best": "*" if best is not None and j["job"] == best["job"] else ""} for j in jobs]
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(_cell(r[c]) for c in columns) + " |" for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return "\n".join(md) + "\n", buf.getvalue()


def plot_eval_curves(jobs: List[Dict[str, Any]], best: Optional[Dict[str, Any]], path: Path) -> Optional[Path]:
    """Every job's eval-loss curve on one set of axes (from each job's metrics step), the best one drawn bold."""
    curves = {}
    for job in jobs:
        metrics = (job["record"].get("steps", {}).get("metrics") or {}).get("outputs") or {}
        if metrics.get("json") and Path(metrics["json"]).exists():
            history = json.loads(Path(metrics["json"]).read_text()).get("history", {}).get("eval_loss") or []
            if history:
                curves[job["job"]] = (job["overrides"], history)
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for num, (label, history) in curves.items():
        steps, values = zip(*sorted((int(s), float(v)) for s, v in history))
        is_best = best is not None and num == best["job"]
        ax.plot(steps, values, marker="o", linewidth=3 if is_best else 1.2,
                label=f"job {num}: {label}" + ("  (best)" if is_best else ""))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("eval loss")
    ax.set_title("Sweep: eval loss per job")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
    return path


def finish_best_job(best: Dict[str, Any], sweep_cfg, sweep_dir: Path, backend_factory=None) -> Optional[Dict[str, Any]]:
    """Register (and optionally deploy, test, clean up) the best job's model, as a run of its own."""
    from runner.workflow import run

    steps = ["register"] + (["deploy", "test", "cleanup"] if sweep_cfg.deploy_best else [])
    job_dir = Path(best["dir"])
    cfg = job_config(job_dir, steps=steps, from_run=str(job_dir), dry_run=False)
    print(f"\nbest job {best['job']} ({best['overrides']}): running {steps}", flush=True)
    record = run(cfg, run_dir=sweep_dir / "best", task_overrides=best["record"].get("overrides", []),
                 backend=backend_factory(cfg) if backend_factory else None)
    from runner.step_results import RegisterResult
    from runner.steps.test import TestResult

    return {"run_dir": str(sweep_dir / "best"), "model_uri": RegisterResult.recorded(record).model_uri,
            "reply": TestResult.recorded(record).reply}


def summarize_sweep(sweep_dir, sweep_cfg, *, finish_best: bool = True, backend_factory=None) -> Dict[str, Any]:
    """`backend_factory(cfg)` replaces the backend of the follow-up runs (tests pass a test double)."""
    sweep_dir = Path(sweep_dir)
    complete_deferred_jobs(sweep_dir, backend_factory)
    jobs = collect_jobs(sweep_dir)
    best = pick_best(jobs, sweep_cfg.metric, sweep_cfg.direction)
    md, csv_text = tables(jobs, best, sweep_cfg.metric, sweep_cfg.direction)
    write_text(sweep_dir / "sweep_summary.md", md)
    write_text(sweep_dir / "sweep_summary.csv", csv_text)
    plot = plot_eval_curves(jobs, best, sweep_dir / "sweep_eval_loss.png")
    failed = [j for j in jobs if j["status"] != "ok"]
    print(f"\nSweep summary ({len(jobs)} jobs, {len(failed)} failed; best by {sweep_cfg.metric}, "
          f"{sweep_cfg.direction}):\n{md}", flush=True)
    print(f"written: {sweep_dir / 'sweep_summary.md'}, {sweep_dir / 'sweep_summary.csv'}"
          + (f", {plot}" if plot else ""), flush=True)
    finished = None
    trained = best is not None and best["record"].get("steps", {}).get("finetune", {}).get("status") == "ok"
    if finish_best and trained and sweep_cfg.register_best:
        try:
            finished = finish_best_job(best, sweep_cfg, sweep_dir, backend_factory)
        except RunnerError as exc:  # e.g. the quality gate refused it: the summary is still written, the exit is 1
            print(f"ftrun: the best job {best['job']} was not registered: {exc}", flush=True)
            finished = {"run_dir": str(sweep_dir / "best"), "error": str(exc)}
    summary = {
        "jobs": [{k: v for k, v in j.items() if k != "record"} for j in jobs],
        "best_job": best["job"] if best else None,
        "failed": [j["job"] for j in failed],
        "plot": str(plot) if plot else None,
        "best_run": finished,
    }
    write_text(sweep_dir / "sweep_summary.json", json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    from runner.schema import SweepConfig

    summarize_sweep(sys.argv[1], OmegaConf.structured(SweepConfig), finish_best=False)
