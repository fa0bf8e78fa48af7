"""Retired VM sizes (runner/azureml/data/retired_skus.yaml) are refused before anything is created, naming the date
and a replacement; no shipped preset names one."""

from pathlib import Path

import pytest
import yaml

from runner.retired_skus import retired, retired_table
from runner.schema import ConfigError
from tests.conftest import REPO, compose_cfg

CONF = REPO / "conf"


def test_the_table_holds_ncv3_with_its_date_replacement_and_source():
    ncv3 = retired("standard_nc6s_v3")  # case-insensitive, as Azure compares sizes
    assert ncv3.series == "NCv3" and ncv3.retired == "2025-09-30"
    assert ncv3.replacement == "Standard_NC24ads_A100_v4" and ncv3.source.startswith("https://learn.microsoft.com/")
    assert retired("Standard_NC24rs_v3").retired == "2025-09-30"
    assert retired("Standard_NC24ads_A100_v4") is None
    # every replacement is itself current
    assert all(retired(r.replacement) is None for r in retired_table().values())


def _sizes(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("size", "instance_type") and isinstance(value, str):
                yield value
            elif key == "instance_types" and isinstance(value, list):
                yield from value
            else:
                yield from _sizes(value)


@pytest.mark.parametrize("group", ["compute", "deployment", "experiment"])
def test_no_shipped_preset_names_a_retired_size(group):
    for path in sorted((CONF / group).glob("*.yaml")):
        for size in _sizes(yaml.safe_load(path.read_text()) or {}):
            assert retired(size) is None, f"{path.name} names {size}, retired ({retired(size)})"
    assert retired(compose_cfg(["backend=azureml", "deployment=azure"]).deployment.instance_type) is None


def test_a_retired_deployment_size_is_refused_up_front_with_date_and_replacement(tmp_path):
    """Refused by config validation: a dry run plans nothing, and a real run makes no call (no client is built)."""
    from runner.workflow import run

    overrides = ["experiment=phi4_ultrachat", "deployment.instance_type=Standard_NC6s_v3", "dataset=sample",
                 "dry_run=true"]
    with pytest.raises(ConfigError) as refused:
        run(compose_cfg(overrides), run_dir=tmp_path / "run", task_overrides=overrides)
    message = str(refused.value)
    assert "deployment.instance_type=Standard_NC6s_v3 is retired" in message
    assert "2025-09-30" in message and "deployment.instance_type=Standard_NC24ads_A100_v4" in message
    assert not (tmp_path / "run" / "plan").exists()


def test_a_retired_cluster_size_is_refused_before_any_call(tmp_path):
    from runner.azureml.backend import AzureMLBackend
    from runner.workflow import run
    from tests.azureml.double import AzureWorld

    world = AzureWorld()
    overrides = ["experiment=phi4_ultrachat", "compute.size=Standard_NC12s_v3", "dataset=sample",
                 "backend.subscription_id=s", "backend.resource_group=r", "backend.workspace_name=w"]
    cfg = compose_cfg(overrides)
    with pytest.raises(ConfigError, match=r"compute.size=Standard_NC12s_v3 is retired: .*2025-09-30.*"
                                          r"compute.size=Standard_NC48ads_A100_v4"):
        run(cfg, run_dir=tmp_path / "run", task_overrides=overrides,
            backend=AzureMLBackend(cfg, clients=world.clients()))
    assert world.calls == []
