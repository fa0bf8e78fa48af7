"""Reaching the workspace's MLflow server without the azureml-mlflow plugin: https + a bearer token, set only for
the read and never left in the environment."""

import os
from types import SimpleNamespace

import pytest

from runner.azureml import metrics

AZ_URI = ("azureml://eastus.api.azureml.ms/mlflow/v1.0/subscriptions/s/resourceGroups/rg/providers/"
          "Microsoft.MachineLearningServices/workspaces/ws")


class Credential:
    def __init__(self):
        self.scopes = []

    def get_token(self, *scopes):
        self.scopes.extend(scopes)
        return SimpleNamespace(token="TOKEN-123")


def test_azureml_uri_becomes_https_with_a_token(monkeypatch):
    monkeypatch.setattr(metrics, "_has_azureml_plugin", lambda: False)
    cred = Credential()
    uri, token = metrics.mlflow_access(AZ_URI, cred)
    assert uri == "https://" + AZ_URI[len("azureml://"):]
    assert token == "TOKEN-123" and cred.scopes == [metrics.MANAGEMENT_SCOPE]
    with pytest.raises(RuntimeError, match="needs an Azure credential"):
        metrics.mlflow_access(AZ_URI, None)


def test_plugin_or_plain_uri_is_used_as_is(monkeypatch):
    monkeypatch.setattr(metrics, "_has_azureml_plugin", lambda: True)
    assert metrics.mlflow_access(AZ_URI, None) == (AZ_URI, None)
    monkeypatch.setattr(metrics, "_has_azureml_plugin", lambda: False)
    assert metrics.mlflow_access("sqlite:///x.db", None) == ("sqlite:///x.db", None)


def test_token_is_only_in_the_environment_during_the_read(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    with metrics._token_env("TOKEN-123"):
        assert os.environ["MLFLOW_TRACKING_TOKEN"] == "TOKEN-123"
    assert "MLFLOW_TRACKING_TOKEN" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "user-own")
    with pytest.raises(KeyError):
        with metrics._token_env("TOKEN-123"):
            raise KeyError("read failed")
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == "user-own"
