"""Which backend runs a config: backend.name picks the local or the Azure ML one. (What a backend implements:
runner/backend_api.py.)"""

from runner.backend_api import Backend


def make_backend(cfg) -> Backend:
    if cfg.backend.name == "local":
        from runner.local.backend import LocalBackend

        return LocalBackend(cfg)
    if cfg.backend.name == "azureml":
        from runner.azureml.backend import AzureMLBackend

        return AzureMLBackend(cfg)
    raise ValueError(f"backend.name={cfg.backend.name!r}: expected 'local' or 'azureml'")
