"""The azureml backend's side of the export step: the registered version fetched with `ml_client.models.download`
(after checking it is still the model the record registered) and the outputs logged as MLflow artifacts of the
job that made it, in the workspace's tracking server. On a dry run the download is recorded, not made, and the
step writes plan/export.yaml naming what would be downloaded and exported."""

import re
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from runner.errors import ConfigError, RunnerError

ARTIFACT_PATH = "export"


class RegisteredModelChanged(RunnerError):
    """The workspace's version is not the model the record registered."""


def parse_model_uri(model_uri: str) -> Tuple[str, str]:
    """(name, version) of models:/NAME/VERSION, azureml:NAME:VERSION or a model version's ARM id."""
    for pattern in (r"^models:/(?P<n>[^/]+)/(?P<v>[^/]+)$", r"^azureml:(?P<n>[^:/]+):(?P<v>[^:/]+)$",
                    r"/models/(?P<n>[^/]+)/versions/(?P<v>[^/]+)$"):
        found = re.search(pattern, model_uri)
        if found:
            return found.group("n"), found.group("v")
    raise ConfigError(f"export.model={model_uri!r}: on azureml name a workspace model version as "
                      "models:/NAME/VERSION or azureml:NAME:VERSION")


def _job_of(model: Any) -> Optional[str]:
    """The job whose output the version was registered from (its MLflow run id is the job name)."""
    found = re.match(r"^azureml://jobs/([^/]+)/", str(getattr(model, "path", "") or ""))
    return getattr(model, "job_name", None) or (found.group(1) if found else None)


def export_source(backend: Any, ctx: Any, model_uri: str, registered: Optional[Dict[str, Any]],
                  work_dir: Path) -> Dict[str, Any]:
    name, version = parse_model_uri(model_uri)
    ws = backend.ws(ctx)
    model = ws.models.get(name=name, version=version)  # a version that is not there is refused by the service
    recorded = (registered or {}).get("source")
    if recorded and not backend.cfg.dry_run and getattr(model, "path", None) and str(model.path) != str(recorded):
        raise RegisteredModelChanged(
            f"{name}:{version} now holds {model.path}, not {recorded} that the record registered (the version was "
            "deleted and registered again for another job). Refused: it would export another model. Register this "
            "run's model again, or export the version you mean with export.model=models:/NAME/VERSION.")
    download = Path(work_dir) / "download"
    ws.models.download(name=name, version=version, download_path=str(download))
    source = {"run_id": _job_of(model), "name": name, "version": version, "base_dir": None}
    if backend.cfg.dry_run:
        ctx.say(f"export: would download {name}:{version} ({model.path}) and export it")
        return {**source, "planned": {"call": "models.download", "name": name, "version": version,
                                      "path": str(getattr(model, "path", "") or "")}}
    from runner.export.source import plain_model_folder

    ctx.say(f"export: downloaded {name}:{version} into {download}")
    return {**source, "folder": str(plain_model_folder(download, Path(work_dir) / "plain"))}


def log_export(backend: Any, ctx: Any, source: Dict[str, Any], out_dir: Path) -> Dict[str, Any]:
    """The outputs under the job's run's `export/` artifacts in the workspace's MLflow."""
    run_id = source.get("run_id")
    if not run_id:
        return {"logged_to": None}
    from mlflow.tracking import MlflowClient

    from runner.azureml.metrics import mlflow_access, token_env

    ws = backend.ws(ctx)
    uri, token = mlflow_access(ws.workspaces.get(ws.workspace_name).mlflow_tracking_uri,
                               backend.session(ctx).credential)
    with token_env(token):
        MlflowClient(tracking_uri=uri).log_artifacts(run_id, str(out_dir), ARTIFACT_PATH)
    return {"logged_to": run_id, "artifact_path": ARTIFACT_PATH}
