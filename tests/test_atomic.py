"""runner/atomic.py: files and folders that are whole or absent, whatever happens while they are written."""

import os
import stat

import pytest

from runner.atomic import staged_dir, write_text


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_folder_appears_only_whole_and_replaces_the_old_one(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.bin").write_text("old")
    with staged_dir(final) as tmp:
        (tmp / "weights.bin").write_text("new")
        assert not (final / "weights.bin").exists()  # not visible while being written
    assert sorted(p.name for p in final.iterdir()) == ["weights.bin"] and _leftovers(tmp_path) == []
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(final.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's owner-only 0700


def test_a_failure_or_a_refused_check_leaves_the_old_folder_as_it_was(tmp_path):
    final = tmp_path / "model"
    write_text(final / "a.txt", "old")
    with pytest.raises(RuntimeError, match="half"):
        with staged_dir(final) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("half written")

    def refuse(folder):
        raise ValueError(f"bad {sorted(p.name for p in folder.iterdir())}")

    with pytest.raises(ValueError, match=r"bad \['a.txt'\]"):
        with staged_dir(final, refuse) as tmp:
            (tmp / "a.txt").write_text("new")
    assert (final / "a.txt").read_text() == "old" and _leftovers(tmp_path) == []


def test_keep_existing_keeps_what_another_process_put_there_first(tmp_path):
    final = tmp_path / "cache-key"
    with staged_dir(final, keep_existing=True) as tmp:
        (tmp / "meta.json").write_text("mine")
        write_text(final / "meta.json", "theirs")  # another process finished the same key meanwhile
    assert (final / "meta.json").read_text() == "theirs" and _leftovers(tmp_path) == []
