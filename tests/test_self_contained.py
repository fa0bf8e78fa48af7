"""The repository stands alone: a user clones only it, so nothing tracked may read a path beside it."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# How a path outside the repository was spelled when the reference specs were read from beside the checkout.
OUTSIDE = ("../shared", "shared/reference", 'parent.parent.parent / "shared"')


def tracked_files():
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:  # an exported tree without .git: every file under the repo
        return [p.relative_to(REPO).as_posix() for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts]
    return out.stdout.split()


def test_no_tracked_file_reads_outside_the_repository():
    offenders = []
    for rel in tracked_files():
        if rel == "tests/test_self_contained.py" or not rel.endswith((".py", ".yaml", ".yml", ".toml", ".sh", ".cfg")):
            continue
        text = (REPO / rel).read_text(encoding="utf-8", errors="replace")
        offenders += [f"{rel}: {needle}" for needle in OUTSIDE if needle in text]
    assert offenders == []


def test_the_component_contract_ships_inside_the_package():
    from runner.azureml.spec import DEFAULT_SPEC, load_spec

    assert REPO / "runner" in DEFAULT_SPEC.parents
    spec = load_spec(str(DEFAULT_SPEC))
    assert (spec.name, spec.version) == ("chat_completion_pipeline", "0.0.82")
    assert spec.inputs["deepspeed_stage"].enum == ["2", "3"]
    assert spec.inputs["train_file_path"].type == "uri_file"
