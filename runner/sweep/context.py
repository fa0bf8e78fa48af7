"""What a multirun job knows about its sweep: an id shared by all jobs, its number, and the values swept."""

import hashlib
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional


def swept_keys(argv: List[str], sweeper_params: Optional[Dict[str, Any]]) -> List[str]:
    """Keys the sweep varies: comma lists/ranges on the command line, plus a search sweeper's `params`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    candidates = [a for a in argv if "=" in a and not a.startswith("-")]
    keys = []
    for override in OverridesParser.create().parse_overrides(candidates):
        if override.is_sweep_override() and not override.get_key_element().startswith("hydra"):
            keys.append(override.get_key_element())
    for key in (sweeper_params or {}):
        if key not in keys:
            keys.append(key)
    return keys


def job_sweep_context(hydra_cfg, argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """From HydraConfig.get() inside a multirun job."""
    argv = list(sys.argv[1:] if argv is None else argv)
    params = hydra_cfg.sweeper.get("params") if "sweeper" in hydra_cfg else None
    keys = swept_keys(argv, dict(params) if params else None)
    values = {}
    for override in hydra_cfg.overrides.task:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if key in keys:
            values[key] = value
    sweep_dir = str(Path(hydra_cfg.sweep.dir).resolve())
    return {
        "id": f"{Path(sweep_dir).name}-{hashlib.sha1(sweep_dir.encode()).hexdigest()[:6]}",
        "dir": sweep_dir,
        "job_num": int(hydra_cfg.job.num),
        "swept": values,
    }
