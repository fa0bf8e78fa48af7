"""The endpoint's sample request: one seeded random row of the sample split, in the notebook's scoring format

    {"input_data": {"input_string": [messages], "parameters": {...}}, "params": {}}

`input_string` holds one conversation. A conversation that ends with an assistant turn loses that turn, so the
endpoint is asked to write it.
"""

import json
import random
from pathlib import Path
from typing import Any, Dict, Optional

from runner.data.jsonl import iter_jsonl
from runner.errors import MissingInput, RunnerError

# The sample request of a dry run when the sample split is not on disk (a dry run downloads nothing).
EXAMPLE_CONVERSATION = [
    {"role": "user", "content": "Write a short story about a lighthouse keeper who finds a message in a bottle."},
]


def pick_row(path, seed: int) -> Dict[str, Any]:
    lines = [line for _, line in iter_jsonl(path)]
    if not lines:
        raise RunnerError(f"{path} has no rows to draw a sample request from (dataset.sample_split)")
    return json.loads(random.Random(seed).choice(lines))


def build_sample_request(sample_file, seed: int, parameters: Dict[str, Any]) -> Dict[str, Any]:
    messages = [{"role": m["role"], "content": m["content"]} for m in pick_row(sample_file, seed)["messages"]]
    if len(messages) > 1 and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return {"input_data": {"input_string": [messages], "parameters": dict(parameters)}, "params": {}}



def sample_file(cfg, recorded: Optional[str]) -> Path:
    """The split whose seeded random row becomes the sample request: the data step's file (`recorded`), else
    where the data step puts it."""
    if recorded:
        return Path(recorded)
    return Path(cfg.dataset.download_dir) / f"{cfg.dataset.sample_split}.jsonl"


def sample_request(cfg, recorded_sample_file: Optional[str]) -> Dict[str, Any]:
    """The request the test step sends (and a plan shows): from the sample split, or, in a dry run with the split
    not on disk, an example conversation."""
    from omegaconf import OmegaConf

    parameters = OmegaConf.to_container(cfg.deployment.sample_parameters, resolve=True)
    source = sample_file(cfg, recorded_sample_file)
    if not source.exists() and cfg.dry_run:  # a plan downloads nothing: an example conversation stands in
        return {"input_data": {"input_string": [EXAMPLE_CONVERSATION], "parameters": parameters}, "params": {}}
    if not source.exists():
        raise MissingInput(
            f"the sample request is drawn from {source}, which does not exist: run the data step first "
            f"(steps=[data,...]) or point from_run= at a run that did"
        )
    return build_sample_request(source, cfg.seed, parameters)
