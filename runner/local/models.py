"""Where the base model comes from: a local folder, the offline tiny model, or a Hugging Face hub id.

Loading goes through transformers' Auto classes in every case, so the rest of the workflow cannot tell a built
model from a downloaded one. `trust_remote_code` stays off unless the model config says so.
"""

from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import OmegaConf

from runner.errors import RunnerError


class ModelSourceError(RunnerError):
    pass


def _check_loadable(model_dir: Path, trust_remote_code: bool) -> Dict[str, Any]:
    from transformers import AutoConfig

    if not (model_dir / "config.json").exists():
        raise ModelSourceError(f"{model_dir} holds no config.json: not a transformers model folder")
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return {"architecture": (config.architectures or [config.model_type])[0], "model_type": config.model_type}


def resolve_base_model(model_cfg, *, models_dir) -> Dict[str, Any]:
    """The base model's folder (built or downloaded when needed) and what it is."""
    trust = bool(model_cfg.trust_remote_code)
    if model_cfg.local_path:
        path, source, built = Path(model_cfg.local_path), "local folder", False
        if not path.is_dir():
            raise ModelSourceError(f"model.local_path={model_cfg.local_path!r} is not a folder")
    elif model_cfg.build_tiny:
        from runner.local.tiny_model import ensure_tiny_model

        tiny = OmegaConf.to_container(model_cfg.tiny, resolve=True)
        path, built = ensure_tiny_model(models_dir, tiny)
        source = "offline tiny Phi-3 (built now)" if built else "offline tiny Phi-3 (cached)"
    elif model_cfg.hf_id:
        path, source, built = download_hf_model(model_cfg.hf_id, models_dir, trust), f"hub {model_cfg.hf_id}", False
    else:
        raise ModelSourceError(
            f"model {model_cfg.name!r} has no local source: set model.local_path=<folder>, model.hf_id=<hub id> "
            f"or use model=tiny_phi3"
        )
    info = _check_loadable(Path(path), trust)
    return {"model_dir": str(Path(path).resolve()), "tokenizer_dir": str(Path(path).resolve()), "source": source,
            "built": built, **info}


def existing_model_dir(model_cfg, *, models_dir) -> Optional[str]:
    """The base model's folder if it is already here (no build, no download), else None."""
    if model_cfg.local_path:
        path = Path(model_cfg.local_path)
    elif model_cfg.build_tiny:
        from runner.local.tiny_model import tiny_model_path

        path = tiny_model_path(models_dir, OmegaConf.to_container(model_cfg.tiny, resolve=True))
    elif model_cfg.hf_id:
        path = Path(models_dir) / "hub" / model_cfg.hf_id.replace("/", "--")
    else:
        return None
    return str(path) if (path / "tokenizer_config.json").exists() else None


def download_hf_model(hf_id: str, models_dir, trust_remote_code: bool) -> Path:
    """Real hub download (snapshot of weights, config and tokenizer). No hub is reachable on this project's
    machines; the error then says how to point at a local copy instead."""
    from huggingface_hub import snapshot_download

    target = Path(models_dir) / "hub" / hf_id.replace("/", "--")
    try:
        snapshot_download(
            repo_id=hf_id,
            local_dir=target,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py" if trust_remote_code else "*.json"],
        )
    except Exception as exc:
        raise ModelSourceError(
            f"could not download {hf_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            f"Download it elsewhere and set model.local_path=<folder>, or use model=tiny_phi3 offline."
        ) from exc
    return target
