"""The register step's staging folders, named after the process that owns them, so that a later run removes only
the folders a killed register left (a partial multi-GB model), never a live one of a concurrent run."""

import hashlib
import re
import shutil
from pathlib import Path
from typing import List, Optional

from runner.liveness import alive, this_process

# .model-<host hash>-<pid>-<pid start>-<random>: the staging folder names its owner, from the moment it exists, so
# a later run removes only the folders of a register that was killed, never a live one of a concurrent run.
STAGING = ".model-"
_STAGING_NAME = re.compile(r"^\.model-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<started>\d+|x)-")


def _host_hash(host: str) -> str:
    return hashlib.sha256(host.encode()).hexdigest()[:8]


def staging_prefix() -> str:
    me = this_process()
    started = "x" if me["pid_started"] is None else me["pid_started"]
    return f"{STAGING}{_host_hash(me['host'])}-{me['pid']}-{started}-"


def staging_owner_alive(folder: Path) -> Optional[bool]:
    """Whether the register that made this staging folder still runs; None when it cannot be told (another host,
    or a folder named before owners were recorded)."""
    import socket

    m = _STAGING_NAME.match(folder.name)
    if not m or m["host"] != _host_hash(socket.gethostname()):
        return None
    started = None if m["started"] == "x" else int(m["started"])
    return alive({"host": socket.gethostname(), "pid": int(m["pid"]), "pid_started": started})


def remove_dead_staging(artifact_root) -> List[str]:
    """Remove the staging folders (<artifact root>/<run id>/artifacts/.model-*, as ftrun's experiments place runs;
    one level deeper under MLflow's default <experiment id>/<run id>) of registers whose process is dead: a killed
    register leaves a partial multi-GB model there. Returns the folders removed."""
    root = Path(artifact_root)
    removed = []
    if not root.is_dir():
        return removed
    folders = [*root.glob(f"*/artifacts/{STAGING}*"), *root.glob(f"*/*/artifacts/{STAGING}*")]
    for folder in folders:
        if folder.is_dir() and staging_owner_alive(folder) is False:
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(str(folder))
    return removed
