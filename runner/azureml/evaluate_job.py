"""The evaluation on Azure ML: a command job that runs the project's own evaluator (`python -m runner.local.evaluate_program`)
on the cluster, over the fine-tune job's output model and the registry base model.

    inputs   base_model  mlflow_model  azureml://registries/<registry>/models/<name>/versions/<v>
             ft_model    mlflow_model  azureml://jobs/<fine-tune job>/outputs/<output>
             rows        uri_file      the held-out split (a local file is uploaded at submission)
    outputs  evaluation  uri_folder    metrics.json, rows.jsonl, report.md, comparison.png
    code     a staged copy of the `runner` package alone (no state, outputs or tests are uploaded)
    environment  a curated environment from config (evaluate.azureml_environment)

The job's metrics reach the workspace's MLflow (Azure ML sets MLFLOW_TRACKING_URI in the job; the program logs to
it), so the workflow reads them back as it reads the fine-tune's. `evaluate_job_yaml` is the YAML a dry run writes
(`evaluate_job.yaml`), loadable with azure.ai.ml.load_job.
"""

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

# Azure ML's own fine-tuning components run in this curated environment (transformers, peft, sacrebleu,
# rouge-score, mlflow on Python 3.10); `version: auto` in the asset, so a version is pinned.
DEFAULT_ENVIRONMENT = "azureml://registries/azureml/environments/acft-hf-nlp-gpu/versions/112"
PROGRAM = "runner.local.evaluate_program"
_FLAGS = (  # settings key -> the program's flag (runner/local/evaluate_program.py)
    ("max_rows", "--max-rows"), ("max_new_tokens", "--max-new-tokens"), ("batch_size", "--batch-size"),
    ("seed", "--seed"), ("time_budget_s", "--time-budget-s"), ("temperature", "--temperature"),
    ("top_p", "--top-p"), ("resamples", "--resamples"),
)


def registry_model_path(registry: str, name: str, version: str) -> str:
    return f"azureml://registries/{registry}/models/{name}/versions/{version}"


def job_output_path(job_name: str, output: str) -> str:
    return f"azureml://jobs/{job_name}/outputs/{output}"


def stage_code(dest) -> Path:
    """The job's code: a copy of the `runner` package (sources only) in `dest`, so the upload holds no run
    state, models or data that a checkout's folders may hold."""
    dest = Path(dest)
    package = Path(__file__).resolve().parents[1]
    target = dest / "runner"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def evaluate_command(settings: Mapping[str, Any]) -> str:
    """The command line the job runs; the ${{...}} references are resolved by Azure ML."""
    parts = ["python -m", PROGRAM, "--base ${{inputs.base_model}}", "--ft ${{inputs.ft_model}}",
             "--rows ${{inputs.rows}}", "--out ${{outputs.evaluation}}"]
    for key, flag in _FLAGS:
        if settings.get(key) is not None:
            parts.append(f"{flag} {settings[key]}")
    metrics = settings.get("metrics")
    if metrics:
        parts.append(f"--metrics {','.join(metrics)}")
    if settings.get("do_sample"):
        parts.append("--do-sample")
    parts.append("--device cuda")  # the cluster's GPU: a job that silently ran on CPU would be a wrong plan
    return " ".join(parts)


def build_evaluate_job(*, code_dir, base_model_path: str, ft_model_path: str, rows_path: str, compute: Optional[str],
                       settings: Mapping[str, Any], environment: str = DEFAULT_ENVIRONMENT,
                       experiment_name: Optional[str] = None, display_name: str = "evaluate-ft-vs-base",
                       instance_type: Optional[str] = None):
    """The azure-ai-ml CommandJob (what jobs.create_or_update is handed)."""
    from azure.ai.ml import Input, Output, command

    node = command(
        code=str(code_dir),
        command=evaluate_command(settings),
        inputs={
            "base_model": Input(type="mlflow_model", path=base_model_path),
            "ft_model": Input(type="mlflow_model", path=ft_model_path),
            "rows": Input(type="uri_file", path=str(rows_path)),
        },
        outputs={"evaluation": Output(type="uri_folder")},
        environment=environment,
        compute=compute,  # None with instance_type: serverless compute of that VM size
        **({"instance_type": instance_type} if instance_type else {}),
        display_name=display_name,
        experiment_name=experiment_name,
        environment_variables={"TOKENIZERS_PARALLELISM": "false"},
    )
    return node._to_job()


def evaluate_job_yaml(job) -> Dict[str, Any]:
    """The job as azure-ai-ml YAML (load_job reads it back). A local rows file is written as its plain path (the
    dump writes `azureml:<path>`, an asset reference), as the pipeline job's data inputs are."""
    data = json.loads(json.dumps(job._to_dict(), default=str))  # the SDK's OrderedDicts -> plain data
    rows = job.inputs["rows"]
    path = str(getattr(rows, "path", "") or "")
    if path and "://" not in path and not path.startswith("azureml:"):
        data["inputs"]["rows"] = {"type": "uri_file", "path": path}
    ordered = {"$schema": "https://azuremlschemas.azureedge.net/latest/commandJob.schema.json"}
    ordered.update(data)
    return ordered
