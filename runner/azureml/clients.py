"""The one seam between the runner and Azure: credential, workspace client and registry client.

Everything the Azure backend does to Azure goes through the objects these three methods return (MLClient
instances), so a test hands AzureClients a call-recording stand-in for MLClient and the credential classes and
sees every call the backend makes, with the real login and workspace-selection logic in between.

Nothing here prints or records a token, a key or a client secret.
"""

import os
from pathlib import Path
from typing import Any, Mapping, Optional

from runner.schema import ConfigError

MANAGEMENT_SCOPE = "https://management.azure.com/.default"

LOGIN_HELP = (
    "Log in one of these ways, then rerun:\n"
    "    az login                                     (Azure CLI; add --use-device-code on a machine without a browser)\n"
    "    export AZURE_TENANT_ID=... AZURE_CLIENT_ID=... AZURE_CLIENT_SECRET=...   (a service principal)\n"
    "    a managed identity on the machine (Azure VM, compute instance, CI runner with workload identity)"
)


class AzureLoginError(ConfigError):
    """No credential could get a token and an interactive login is not allowed."""


class WorkspaceNotConfigured(ConfigError):
    """Neither a config.json nor the three workspace ids."""


def interactive_allowed(backend_cfg: Any, environ: Optional[Mapping[str, str]] = None) -> tuple[bool, str]:
    environ = os.environ if environ is None else environ
    if environ.get("CI"):
        return False, "the CI environment variable is set"
    if not backend_cfg.interactive:
        return False, "backend.interactive=false"
    return True, ""


def _short(exc: BaseException) -> str:
    """The first line of an error, bounded: credential chains can be long, and none of it is a secret."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


class AzureClients:
    """Creates the credential and the two MLClients the notebook uses.

    The classes are parameters so that tests can pass call-recording stand-ins; by default they are azure-identity's
    DefaultAzureCredential / InteractiveBrowserCredential and azure-ai-ml's MLClient (imported when first needed).
    """

    def __init__(self, *, mlclient_cls=None, default_credential_cls=None, interactive_credential_cls=None,
                 environ: Optional[Mapping[str, str]] = None):
        self._mlclient_cls = mlclient_cls
        self._default_credential_cls = default_credential_cls
        self._interactive_credential_cls = interactive_credential_cls
        self._environ = environ

    # ---- classes, imported lazily (azure.ai.ml costs ~1.5 s) --------------------------------------------------
    @property
    def mlclient_cls(self):
        if self._mlclient_cls is None:
            from azure.ai.ml import MLClient

            self._mlclient_cls = MLClient
        return self._mlclient_cls

    def _default_cls(self):
        if self._default_credential_cls is None:
            from azure.identity import DefaultAzureCredential

            self._default_credential_cls = DefaultAzureCredential
        return self._default_credential_cls

    def _interactive_cls(self):
        if self._interactive_credential_cls is None:
            from azure.identity import InteractiveBrowserCredential

            self._interactive_credential_cls = InteractiveBrowserCredential
        return self._interactive_credential_cls

    # ---- the seam -------------------------------------------------------------------------------------------
    def credential(self, backend_cfg: Any) -> Any:
        """DefaultAzureCredential if it can get a token, else an interactive browser login (when allowed)."""
        credential = self._default_cls()()
        try:
            credential.get_token(MANAGEMENT_SCOPE)  # the token itself is dropped on the floor: only success counts
            return credential
        except Exception as exc:  # any failure of the chain: the notebook falls back the same way
            reason = _short(exc)
        allowed, why_not = interactive_allowed(backend_cfg, self._environ)
        if not allowed:
            raise AzureLoginError(
                f"Azure login failed: DefaultAzureCredential could not get a token ({reason}). An interactive "
                f"browser login is not attempted because {why_not}.\n{LOGIN_HELP}"
            )
        return self._interactive_cls()()

    def workspace(self, credential: Any, backend_cfg: Any) -> Any:
        """MLClient.from_config(config.json) when the file exists, else the three ids from the config."""
        path = backend_cfg.config_path
        from_config_error = None
        if path and Path(path).is_file():
            try:
                return self.mlclient_cls.from_config(credential=credential, path=str(path))
            except Exception as exc:  # a broken config.json: fall back to the ids, as the notebook does
                from_config_error = _short(exc)
        ids = {
            "backend.subscription_id (env AZURE_SUBSCRIPTION_ID)": backend_cfg.subscription_id,
            "backend.resource_group (env AZURE_RESOURCE_GROUP)": backend_cfg.resource_group,
            "backend.workspace_name (env AZUREML_WORKSPACE_NAME)": backend_cfg.workspace_name,
        }
        missing = [key for key, value in ids.items() if not value]
        if missing:
            where = (f"{path} could not be read ({from_config_error})" if from_config_error
                     else f"no workspace config file at backend.config_path={path!r}")
            raise WorkspaceNotConfigured(
                f"which Azure ML workspace? {where}, and these are not set: {'; '.join(missing)}.\n"
                f"    Either download config.json from the workspace's page in the Azure portal and point "
                f"backend.config_path at it,\n    or export AZURE_SUBSCRIPTION_ID=... AZURE_RESOURCE_GROUP=... "
                f"AZUREML_WORKSPACE_NAME=... (or pass backend.subscription_id=... etc.)"
            )
        return self.mlclient_cls(
            credential,
            subscription_id=backend_cfg.subscription_id,
            resource_group_name=backend_cfg.resource_group,
            workspace_name=backend_cfg.workspace_name,
        )

    def registry(self, credential: Any, registry_name: str) -> Any:
        return self.mlclient_cls(credential, registry_name=registry_name)

    def post_json(self, url: str, body: Any, headers: Mapping[str, str], timeout: float) -> Any:
        """An endpoint call that is no MLClient method (a serverless endpoint's /v1/chat/completions)."""
        from runner.azureml.serverless import post_json

        return post_json(url, body, headers, timeout)
