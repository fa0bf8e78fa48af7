"""The workflow's steps, one module each, in order:

    connect → model → compute → data → finetune → metrics → evaluate → register → export → deploy → test → cleanup

Each module owns what its step means whatever the backend: the preconditions it checks before the backend is
asked (an earlier step's outputs it needs), the shared work (the data step's download and validation, the test
step's sample request), and a typed result. `run(ctx, backend)` returns that result; the backend only acts.
The result's fields are what the run record, the run summary and the sweep summary read; whatever else a backend
reports rides along in `details` and is recorded beside them.
"""

from importlib import import_module
from typing import Dict

from runner.schema import STEPS


def step_module(name: str):
    if name not in STEPS:
        raise KeyError(f"no step {name!r}; steps are {STEPS}")
    return import_module(f"runner.steps.{name}")


def run_step(name: str, ctx, backend) -> Dict:
    """Run one step and return its outputs as the run record stores them."""
    return step_module(name).run(ctx, backend).to_outputs()
