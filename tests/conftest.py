"""Shared test helpers: compose the real config tree with Hydra's compose API, and keep all state in tmp."""

import gc
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from runner.schema import register_configs

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")

register_configs()


def compose_cfg(overrides=()):
    """The resolved-to-be config exactly as `ftrun <overrides>` would compose it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="test"):
        return compose(config_name="config", overrides=list(overrides))


_modules_when_frozen = [0]


@pytest.fixture(autouse=True)
def _freeze_new_imports():
    """After a test imported a library (torch, transformers, mlflow, azure ...), its objects are frozen out of the
    cyclic collector's full collections (runner/heap.py says why: ~30% of a training test's time went to walking
    them). Frozen objects are never collected, so this runs only when many modules arrived, between tests."""
    yield
    if len(sys.modules) > _modules_when_frozen[0] + 100:
        gc.freeze()
        _modules_when_frozen[0] = len(sys.modules)


@pytest.fixture(autouse=True)
def ftrun_home(tmp_path, monkeypatch):
    """Every test gets its own state folder (MLflow store, models, data, endpoints)."""
    home = tmp_path / "ftrun_home"
    monkeypatch.setenv("FTRUN_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def sdist(request, tmp_path_factory):
    """The pinned llama-cpp-python sdist (llama.cpp's converter): downloaded once into pytest's cache, or into this
    session's temp folder when the cache plugin is off (`-p no:cacheprovider`: the suite passes however started)."""
    from tests.export.helpers import locate_sdist

    cache = getattr(request.config, "cache", None)
    folder = cache.mkdir("llama-cpp-python-sdist") if cache is not None else tmp_path_factory.mktemp("sdist")
    return locate_sdist(Path(folder))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The offline tiny Phi-3 model, built once per test session."""
    from runner.local.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-phi3")


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    """The endpoint's generator on the tiny model, in this process (no server)."""
    from runner.local.endpoint.generation import ChatGenerator

    return ChatGenerator.from_uri(str(tiny_model_dir))


def run_batch(generator, jobs):
    """One shared generate call over `jobs`; each job's result, in order."""
    results = [None] * len(jobs)
    for i, job in enumerate(jobs):
        job.on_done = lambda r, i=i: results.__setitem__(i, r)
    generator.run_batch(jobs)
    assert all(r is not None for r in results), "every job gets exactly one result"
    return results
