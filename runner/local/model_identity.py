"""What a run record registered, and the check that a registered version is still that model.

A record names `models:/<name>/<version>`; a store that was recreated or repaired hands the same version number
to another run's model. So the register step records the version's MLflow run id and a content checksum of its
model files, and every step that takes a model from a record (deploy, test, and evaluate/export) calls
`verify_registered_model` first: a mismatch is refused naming both runs, and a version whose files are missing is
refused before any endpoint process is started.
"""

import hashlib
from pathlib import Path
from typing import Any, Dict, Optional

from runner.errors import RunnerError


class ModelIdentityMismatch(RunnerError):
    """The registered version is no longer the model the record registered."""


class ModelFilesMissing(RunnerError):
    """The registered version's model folder is gone."""


# MLflow writes this into a version's folder when the version is loaded by its models:/ URI (the endpoint does):
# bookkeeping, not the model.
NOT_MODEL_FILES = {"registered_model_meta"}


def content_sha256(folder) -> str:
    """One checksum over a folder's files: each file's relative path and sha256, in sorted order."""
    from runner.atomic import sha256_file

    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in NOT_MODEL_FILES):
        digest.update(f"{path.relative_to(root).as_posix()}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def _parse_models_uri(model_uri: str) -> Optional[tuple]:
    if not model_uri.startswith("models:/"):
        return None
    name, _, version = model_uri[len("models:/"):].rpartition("/")
    return (name, version) if name and version.isdigit() else None


def model_folder(tracking_uri: str, model_uri: str) -> Dict[str, Any]:
    """{"run_id", "source", "folder"} of a registered version (folder None for a remote artifact store).
    Refuses a version whose local model folder is missing, naming it."""
    from mlflow.exceptions import MlflowException

    from runner.local.registry import local_artifact_dir
    from runner.local.tracking import mlflow_client

    parsed = _parse_models_uri(model_uri)
    if parsed is None:  # a plain folder or runs:/ URI: nothing registered to check against
        folder = Path(model_uri)
        return {"run_id": None, "source": model_uri, "folder": folder if folder.is_dir() else None}
    try:
        version = mlflow_client(tracking_uri).get_model_version(*parsed)
    except MlflowException as exc:
        raise ModelIdentityMismatch(f"{model_uri} is not in the registry at {tracking_uri} ({exc.message}); the "
                                    "store was replaced or the version deleted: run register again") from exc
    folder = local_artifact_dir(version.source)
    if folder is not None and not (folder / "MLmodel").is_file():
        raise ModelFilesMissing(f"the files of {model_uri} are missing: {folder} "
                                f"{'has no MLmodel' if folder.is_dir() else 'does not exist'}. Register the model "
                                "again (steps=[register] from_run=<the run dir that fine-tuned it>)")
    return {"run_id": version.run_id, "source": version.source, "folder": folder}


def identity(tracking_uri: str, model_uri: str) -> Dict[str, Any]:
    """What the register step records: the version's MLflow run id and the checksum of its model files."""
    found = model_folder(tracking_uri, model_uri)
    sha = content_sha256(found["folder"]) if found["folder"] is not None else None
    return {"registered_run_id": found["run_id"], "model_sha256": sha}


def verify_registered_model(tracking_uri: str, registered: Dict[str, Any]) -> Dict[str, Any]:
    """Check a record's register outputs ({"model_uri", "run_id", "model_sha256"}) against the registry now;
    returns the current identity, raises ModelIdentityMismatch / ModelFilesMissing. For evaluate/export too."""
    model_uri = registered.get("model_uri")
    if not model_uri:
        raise ModelIdentityMismatch("the record names no registered model (no register step output)")
    found = model_folder(tracking_uri, model_uri)
    expected_run = registered.get("registered_run_id") or registered.get("run_id")
    if expected_run and found["run_id"] and expected_run != found["run_id"]:
        raise ModelIdentityMismatch(
            f"{model_uri} now belongs to MLflow run {found['run_id']}, not to run {expected_run} that the record "
            "registered (the store was replaced or repaired and the version number handed out again). Refused: "
            "it would serve another run's model. Register this run's model again, or deploy the other run's "
            "record.")
    expected_sha = registered.get("model_sha256")
    sha = content_sha256(found["folder"]) if expected_sha and found["folder"] is not None else None
    if expected_sha and sha and sha != expected_sha:
        raise ModelIdentityMismatch(
            f"the files of {model_uri} (run {found['run_id']}, {found['folder']}) changed since run "
            f"{expected_run} registered them: checksum {sha[:12]} is not the recorded {expected_sha[:12]}. Refused; "
            "register the model again.")
    return {"registered_run_id": found["run_id"], "model_sha256": sha or expected_sha}
