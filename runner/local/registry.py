"""The local `register` step: a fine-tuned model folder -> an MLflow transformers-flavour chat model, registered
as a new version with lineage tags. Idempotent per run: a retry finds the version made for that run.

The model is saved straight into the run's artifact folder (a temp folder next to it, then os.replace), so a
multi-GB model is written once and a crash never leaves a half-written `model/` behind. Everything goes through an
MlflowClient bound to the given URI; the global tracking URI is never changed.
"""

import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from runner.errors import RunnerError
from runner.gate import GATE_PASSED, GATE_TAG
from runner.staging import staging_prefix
from runner.local.store import store_lock
from runner.local.tracking import MAX_TAG_VALUE, clipped_text, mlflow_client

ARTIFACT_PATH = "model"
# What a fresh environment needs to load and run the model. Pinned from the installed versions (an inferred list
# would need torchvision, which is not installed; FACTS.md).
_REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "accelerate", "safetensors")
# Greedy by default: deterministic replies, and a request's temperature=0.0 does not reach transformers' sampler
# (which raises on it). max_new_tokens keeps a request without max_tokens from stopping at transformers' 20 tokens.
INFERENCE_CONFIG = {"do_sample": False, "max_new_tokens": 128}


def pip_requirements() -> List[str]:
    reqs = []
    for package in _REQUIREMENTS:
        try:
            version = metadata.version(package).split("+")[0]  # 2.13.0+cpu -> 2.13.0 (local builds aren't on PyPI)
        except metadata.PackageNotFoundError:
            continue
        reqs.append(f"{package}=={version}")
    return reqs


def _quote(name: str) -> str:
    return '"' + name + '"' if "'" in name else "'" + name + "'"


def _versions(client, name: str) -> list:
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name={_quote(name)}", max_results=1000, page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return versions


def _describe(v) -> Dict[str, Any]:
    return {"name": v.name, "version": int(v.version), "model_uri": f"models:/{v.name}/{v.version}",
            "run_id": v.run_id, "source": v.source, "tags": dict(v.tags)}


def latest_version(tracking_uri: str, name: str) -> Optional[Dict[str, Any]]:
    """The highest version of a registered model as {name, version, model_uri, run_id, source, tags}, or None."""
    versions = _versions(mlflow_client(tracking_uri), name)
    return _describe(max(versions, key=lambda v: int(v.version))) if versions else None


def run_facts(tracking_uri: str, run_id: str) -> Dict[str, Any]:
    """{"status", "params", "tags"} of an MLflow run; {} when the run is not in the store."""
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow_client(tracking_uri).get_run(run_id)
    except MlflowException:
        return {}
    return {"status": run.info.status, "params": dict(run.data.params), "tags": dict(run.data.tags)}


class NotDeployable(RunnerError):
    """The latest registered version was not made by a successful run (or there is none)."""


def deployable_latest(tracking_uri: str, name: str) -> Dict[str, Any]:
    """The latest version of `name` (as latest_version, plus "quality_gate"), for a deploy that names no run: only
    when the MLflow run that made it FINISHED and its model passed the register step's quality gate. Anything else
    is refused naming the version and why, rather than serving whatever was registered last."""
    latest = latest_version(tracking_uri, name)
    if not latest:
        raise NotDeployable(f"no registered model to deploy: no version of {name!r} in {tracking_uri}; run the "
                            "register step first")
    problems = []
    facts = run_facts(tracking_uri, latest["run_id"]) if latest.get("run_id") else {}
    if facts.get("status") != "FINISHED":
        problems.append(f"its MLflow run {latest.get('run_id')} is {facts.get('status') or 'not in the store'}, "
                        "not FINISHED")
    gate = latest["tags"].get(GATE_TAG)
    if gate != GATE_PASSED:
        problems.append(f"it did not pass the quality gate ({GATE_TAG}: {gate or 'not recorded'})")
    if problems:
        raise NotDeployable(f"the latest version {latest['model_uri']} is not deployed: " + "; ".join(problems)
                            + ". Deploy a run's model by naming it: steps=[deploy] from_run=<the run dir that "
                            "registered it>")
    return {**latest, "quality_gate": gate}


def local_artifact_dir(artifact_uri: str) -> Optional[Path]:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    repo = get_artifact_repository(artifact_uri)
    return Path(repo.artifact_dir) if isinstance(repo, LocalArtifactRepository) else None



def _save_chat_model(model_dir: str, dest: Path, model_name: str) -> None:
    """mlflow.transformers.save_model of the folder's model + tokenizer with the chat task into `dest`."""
    import mlflow.transformers
    from huggingface_hub import ModelCard

    from runner.local.endpoint.generation import load_components
    from runner.quiet import quiet_mlflow

    quiet_mlflow()
    # Transformers 5 breaks MLflow's path-only (no load) save; loading the folder is what works here.
    model, tokenizer = load_components(model_dir)
    components = {"model": model, "tokenizer": tokenizer}
    # Our own card, so MLflow does not try to fetch one from the Hugging Face Hub (offline here).
    card = ModelCard(f"---\nlicense: other\n---\n# {model_name}\n\nFine-tuned chat model from {model_dir}.\n")
    mlflow.transformers.save_model(
        components, path=str(dest), task="llm/v1/chat", pip_requirements=pip_requirements(),
        model_card=card, model_config=dict(INFERENCE_CONFIG))


def _log_model(client, run_id: str, model_dir: str, model_name: str) -> str:
    """The run's `model` artifact (saved now unless an earlier attempt already did), as the version source URI."""
    artifact_uri = client.get_run(run_id).info.artifact_uri
    local = local_artifact_dir(artifact_uri)
    if local is not None:
        final = local / ARTIFACT_PATH
        if not (final / "MLmodel").is_file():  # MLmodel is written last: its presence means a complete save
            local.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=staging_prefix(), dir=local))
            try:
                _save_chat_model(model_dir, staging / ARTIFACT_PATH, model_name)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(staging / ARTIFACT_PATH, final)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    else:  # remote artifact store: save locally, upload
        with tempfile.TemporaryDirectory() as tmp:
            _save_chat_model(model_dir, Path(tmp) / ARTIFACT_PATH, model_name)
            client.log_artifacts(run_id, str(Path(tmp) / ARTIFACT_PATH), ARTIFACT_PATH)
    return f"{artifact_uri.rstrip('/')}/{ARTIFACT_PATH}"


def register_model(*, tracking_uri: str, run_id: str, model_dir: str, registered_name: str,
                   tags: Mapping[str, Any], description: str = "") -> Dict[str, Any]:
    """{"name", "version", "model_uri", "reused"}: a new version of `registered_name` for this run's model, or the
    one an earlier call already made for the same run (reused=True)."""
    from mlflow.exceptions import MlflowException

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a saved Hugging Face model folder (no config.json): the "
                                "finetune step's final_model_dir must be written with save_pretrained")
    client = mlflow_client(tracking_uri)
    for v in _versions(client, registered_name):
        if v.run_id == run_id or v.tags.get("mlflow_run_id") == run_id:
            return {**_describe(v), "reused": True}

    source = _log_model(client, run_id, model_dir, registered_name)
    version_tags = {str(k): clipped_text(v, MAX_TAG_VALUE) for k, v in tags.items()}
    version_tags["mlflow_run_id"] = run_id
    with store_lock(tracking_uri):  # runs sharing the store: one creates the name, versions are numbered in turn
        try:
            client.create_registered_model(registered_name, description=description or None)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        v = client.create_model_version(registered_name, source=source, run_id=run_id, tags=version_tags,
                                        description=description or None)
    return {**_describe(v), "reused": False}
