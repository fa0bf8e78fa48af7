"""The pipeline job's training metrics, read through MLflow from the workspace's tracking server.

An Azure ML pipeline job is an MLflow run whose id is the job name; its steps are descendant runs (the fine-tune
step's run holds loss, eval_loss, learning_rate, ...). We walk the descendants by `mlflow.parentRunId` and collect
every metric's full history as {metric: [[step, value], ...]}, the shape runner.metrics_report.report() plots.

The workspace's tracking URI is `azureml://<region>.api.azureml.ms/mlflow/v1.0/...`. With the azureml-mlflow plugin
installed, MLflow handles that scheme (and authentication) itself. azureml-mlflow cannot be installed next to
mlflow 3.17 (it caps mlflow-skinny at 3.15), so without it the same REST API is reached over https with an Entra ID
token passed the standard MLflow way (MLFLOW_TRACKING_TOKEN, set only for the duration of the read and never logged).
"""

import contextlib
import os
from typing import Any, Dict, Iterator, List, Optional

MANAGEMENT_SCOPE = "https://management.azure.com/.default"


def _has_azureml_plugin() -> bool:
    try:
        import azureml.mlflow  # noqa: F401  (registers the azureml:// tracking scheme)
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _token_env(token: Optional[str]) -> Iterator[None]:
    if token is None:
        yield
        return
    old = os.environ.get("MLFLOW_TRACKING_TOKEN")
    os.environ["MLFLOW_TRACKING_TOKEN"] = token
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_TOKEN", None)
        else:
            os.environ["MLFLOW_TRACKING_TOKEN"] = old


token_env = _token_env  # the export step logs artifacts with the same token handling


def mlflow_access(tracking_uri: str, credential: Any = None) -> tuple[str, Optional[str]]:
    """(the URI MLflow should use, a bearer token or None)."""
    if not tracking_uri.startswith("azureml://") or _has_azureml_plugin():
        return tracking_uri, None
    if credential is None:
        raise RuntimeError(f"reading metrics from {tracking_uri.split('/mlflow')[0]} needs an Azure credential")
    token = credential.get_token(MANAGEMENT_SCOPE).token
    return "https://" + tracking_uri[len("azureml://"):], token


def _descendants(client: Any, root_id: str, experiment_id: str) -> List[Any]:
    runs, frontier, seen = [], [root_id], {root_id}
    while frontier:
        parent = frontier.pop()
        children = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                                      max_results=1000)
        for run in children:
            if run.info.run_id not in seen:
                seen.add(run.info.run_id)
                runs.append(run)
                frontier.append(run.info.run_id)
    return runs


def read_job_metrics(tracking_uri: str, job_name: str, credential: Any = None) -> Dict[str, List[List[float]]]:
    """Every metric of the job and its steps as {name: [[step, value], ...]} (the longest history per name)."""
    from mlflow.tracking import MlflowClient

    uri, token = mlflow_access(tracking_uri, credential)
    with _token_env(token):
        client = MlflowClient(tracking_uri=uri)
        root = client.get_run(job_name)
        runs = [root] + _descendants(client, job_name, root.info.experiment_id)
        history: Dict[str, List[List[float]]] = {}
        for run in runs:
            for key in run.data.metrics:
                points = sorted(
                    ([m.step, m.value] for m in client.get_metric_history(run.info.run_id, key)),
                    key=lambda p: p[0],
                )
                if len(points) > len(history.get(key, [])):
                    history[key] = points
    return history
