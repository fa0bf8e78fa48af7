"""Who owns a piece of state (a run record, a register staging folder), and whether that process still lives.

An owner is {"host", "pid", "pid_started"}: the start time (Linux /proc ticks) tells a live owner from another
process that reused its pid. Only this host's processes can be checked: another host's owner is unknown (None),
and what it owns is left alone.
"""

import os
import socket
from typing import Any, Dict, Optional


def _stat(pid: int) -> tuple:
    """(state, start time in clock ticks since boot) from /proc/<pid>/stat (fields 3 and 22); Nones where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None, None


def _started(pid: int) -> Optional[int]:
    return _stat(pid)[1]


def this_process() -> Dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_started": _started(pid)}


def alive(owner: Dict[str, Any]) -> Optional[bool]:
    """True/False for an owner on this host; None when it cannot be told (another host, no pid recorded)."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or owner.get("host") != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    state, now = _stat(pid)
    if state in ("Z", "X"):  # killed, not yet reaped by its parent: dead all the same
        return False
    started = owner.get("pid_started")
    return not (started is not None and now is not None and now != started)
