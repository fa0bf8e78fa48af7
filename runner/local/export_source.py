"""The local backend's side of the export step: the registered version's files (checked against the record
first) as a local folder, and the outputs logged as MLflow artifacts of the version's run."""

from pathlib import Path
from typing import Any, Dict, Optional

from runner.errors import MissingInput

ARTIFACT_PATH = "export"


def export_source(tracking_uri: str, model_uri: str, registered: Optional[Dict[str, Any]], work_dir: Path
                  ) -> Dict[str, Any]:
    from runner.export.source import plain_model_folder
    from runner.local.model_identity import model_folder, verify_registered_model

    if registered:  # still the model the record registered, its files unchanged
        verify_registered_model(tracking_uri, registered)
    if not model_uri.startswith("models:/"):  # a plain model folder (export.model=PATH): nothing registered
        return {"folder": model_uri, "run_id": None, "base_dir": None, "name": Path(model_uri).name}
    found = model_folder(tracking_uri, model_uri)  # refuses a version that is not there or lost its files
    if found["folder"] is None:
        raise MissingInput(f"{model_uri} lives in a remote artifact store; export it where its files are local")
    name, _, version = model_uri[len("models:/"):].rpartition("/")
    from runner.local.tracking import mlflow_client

    tags = mlflow_client(tracking_uri).get_model_version(name, version).tags or {}
    base_dir = tags.get("base_model_dir") or None
    return {"folder": str(plain_model_folder(found["folder"], work_dir)), "run_id": found["run_id"],
            "base_dir": base_dir if base_dir and Path(base_dir).is_dir() else None, "name": name,
            "version": version}


def log_export(tracking_uri: str, source: Dict[str, Any], out_dir: Path) -> Dict[str, Any]:
    """The export's files under the version's run's `export/` artifacts (nothing to log to for a plain folder)."""
    run_id = source.get("run_id")
    if not run_id:
        return {"logged_to": None}
    from runner.local.tracking import mlflow_client

    mlflow_client(tracking_uri).log_artifacts(run_id, str(out_dir), ARTIFACT_PATH)
    return {"logged_to": run_id, "artifact_path": ARTIFACT_PATH}
