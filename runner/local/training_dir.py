"""Which folder a local fine-tune writes into when several runs share one state root.

Layout: `<root>/training/<training key>/<run folder>/` (checkpoints/, metrics.jsonl, final_model/, result.json),
where the training key is the identity of the training (model, data, settings: LocalBackend.training_key) and the
run folder is `<UTC time>-<pid>-<random>`, one per run. The run holds an exclusive lock on `<run folder>/.lock`
for the life of its process (runner/locks.py: released by the kernel however the process ends).

Why a folder per run and not one content-addressed folder with a lock: the folder is live well after training
(the register step copies final_model/ from it), so a second run of the same config would have to wait out the
whole first run or hand back a result it did not train (and its own MLflow run would have no metrics). With a
folder each, two runs of one config never write into the same folder; metrics.jsonl holds one run's rows.

finetune.resume_from_checkpoint=true takes over the newest folder of that key that no live process holds and that
has a complete checkpoint, so a killed run restarted with the same settings continues from its checkpoints
whatever its run dir. Folders of the key that no live process holds are removed when a run takes its folder (a
rerun used to overwrite the one folder of its key): disk use stays one folder per key plus the live runs'.
"""

import os
import re
import secrets
import shutil
import time
from pathlib import Path
from typing import List, Optional

from runner import locks
from runner.local import checkpoints as ckpt

LOCK = ".lock"
_CLAIM = ".claim.lock"  # held while a run chooses or removes folders of one key
# what _new_name() makes: anything else in a key's folder (an older layout's checkpoints/) is neither used nor removed
_RUN_FOLDER = re.compile(r"^\d{8}T\d{6}-\d+-[0-9a-f]{6}$")


def lock_file(folder) -> Path:
    return Path(folder) / LOCK


def run_folders(key_dir) -> List[Path]:
    """The run folders of one training key, oldest first (their names start with the UTC time)."""
    key_dir = Path(key_dir)
    if not key_dir.is_dir():
        return []
    return sorted((p for p in key_dir.iterdir() if p.is_dir() and _RUN_FOLDER.match(p.name)), key=lambda p: p.name)


def is_live(folder) -> bool:
    """Whether a run (this process or another) holds the folder now."""
    return locks.held(lock_file(folder)) or locks.is_locked_elsewhere(lock_file(folder))


def _new_name() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}-{secrets.token_hex(3)}"


def claim(key_dir, *, resume: bool) -> dict:
    """The folder this run trains in, locked by this process until it exits. Returns {"out_dir", "resumed_folder"
    (True when an earlier run's folder was taken over), "removed" (names of stale folders removed)}."""
    key_dir = Path(key_dir)
    key_dir.mkdir(parents=True, exist_ok=True)
    with locks.exclusive(key_dir / _CLAIM):  # two runs choosing at once would both pick the same free folder
        folders = run_folders(key_dir)
        chosen: Optional[Path] = None
        if resume:
            for folder in reversed(folders):
                if not is_live(folder) and ckpt.latest_complete(folder / "checkpoints") is not None:
                    chosen = folder
                    break
        taken_over = chosen is not None
        if chosen is None:
            chosen = key_dir / _new_name()
            chosen.mkdir()
        locks.hold(lock_file(chosen))
        removed = []
        for folder in folders:
            if folder != chosen and not is_live(folder):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
    return {"out_dir": chosen, "resumed_folder": taken_over, "removed": removed}


def hold_for_training(out_dir) -> bool:
    """A trainer called without claim() (train() used as a library): refuse to write into a folder another live
    process trains in. Returns whether the lock was taken here (the caller releases it when training ends); False
    when this process held it already (claim()) and for torchrun workers, whose launching process holds it."""
    from runner.errors import RunnerError

    if "WORLD_SIZE" in os.environ or locks.held(lock_file(out_dir)):
        return False
    try:
        locks.hold(lock_file(out_dir))
    except locks.LockBusy:
        raise RunnerError(f"{out_dir} is in use by another live training run (it holds {lock_file(out_dir)}): "
                          f"two runs must never write into one training folder; give this one its own out_dir, "
                          f"or wait for the other to finish") from None
    return True


def release(out_dir) -> None:
    locks.release(lock_file(out_dir))
