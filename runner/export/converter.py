"""llama.cpp's own HF -> GGUF converter, fetched at run time, never copied into this project.

It ships in the llama-cpp-python source distribution on the package registry as
vendor/llama.cpp/convert_hf_to_gguf.py (with its `conversion` package and gguf-py beside it). The first export
downloads that sdist with pip into <state root>/cache/llama.cpp-converter/, checks its sha256 against the pin in
converter_pin.json (so a changed upload is refused, not run), extracts the converter's files only and runs it as
a subprocess with this interpreter. `export.converter` may name an sdist tarball (checked against the pin too), a
folder holding that tarball (a wheelhouse, a pip download folder), or an extracted llama.cpp folder holding
convert_hf_to_gguf.py (used as it is: the user vouches for it).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Set

from runner.atomic import sha256_file
from runner.export.errors import ExportError
from runner.export.files import staged_dir

PIN = json.loads((Path(__file__).with_name("converter_pin.json")).read_text())
_PREFIX = f"llama_cpp_python-{PIN['version']}/vendor/llama.cpp/"
# What the converter needs from the sdist (it puts gguf-py/ on its own sys.path).
_NEEDED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "gguf-py/pyproject.toml")
_REGISTER = re.compile(r"@ModelBase\.register\(([^)]*)\)")


@dataclass(frozen=True)
class Converter:
    root: Path  # the llama.cpp folder: convert_hf_to_gguf.py, conversion/, gguf-py/
    origin: str  # where it came from, for the run record

    @property
    def script(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    def architectures(self) -> Set[str]:
        """The HF `architectures` names the converter registers a model class for (read from its source, so the
        check runs before any conversion starts)."""
        sources = [self.script, *sorted((self.root / "conversion").glob("*.py"))]
        names: Set[str] = set()
        for src in sources:
            if src.is_file():
                for args in _REGISTER.findall(src.read_text(encoding="utf-8", errors="replace")):
                    names.update(re.findall(r"[\"']([A-Za-z0-9_]+)[\"']", args))
        return names

    def check_architecture(self, config: dict) -> str:
        archs = config.get("architectures") or []
        if not archs:
            raise ExportError("the model's config.json names no `architectures`, so llama.cpp's converter cannot "
                              "tell which model class to use")
        known = self.architectures()
        if archs[0] not in known:
            near = sorted(a for a in known if a.lower().startswith(archs[0][:4].lower()))[:8]
            raise ExportError(f"llama.cpp's converter ({self.origin}) does not cover the architecture "
                              f"{archs[0]!r}, so no GGUF can be made of this model" +
                              (f"; it knows e.g. {', '.join(near)}" if near else "") +
                              "; export the `merged` format instead")
        return archs[0]

    def convert(self, model_dir, outfile, outtype: str, log_file,
                say: Optional[Callable[[str], None]] = None) -> None:
        """Run convert_hf_to_gguf.py; its whole output goes to log_file, the tail into the error on failure."""
        cmd = [sys.executable, str(self.script), str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
        env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # the converter's own gguf-py
        if say:
            say(f"export: llama.cpp convert_hf_to_gguf.py --outtype {outtype} ...")
        with open(log_file, "w", encoding="utf-8") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(self.root))
        if proc.returncode != 0:
            tail = Path(log_file).read_text(encoding="utf-8", errors="replace").strip().splitlines()[-12:]
            raise ExportError(f"llama.cpp's converter failed (exit {proc.returncode}) on {model_dir}; the last "
                              f"lines of {log_file}:\n  " + "\n  ".join(tail))


sha256_of = sha256_file  # the one file digest (runner/atomic.py), under the name the tests import


def _check_pin(tarball: Path) -> None:
    got = sha256_of(tarball)
    if got != PIN["sha256"]:
        raise ExportError(f"{tarball} has sha256 {got}, not the pinned {PIN['sha256']} of {PIN['sdist']} "
                          f"(runner/export/converter_pin.json); refusing to run code from it")


def _extract(tarball: Path, dest: Path) -> Path:
    """The converter's files only, into dest (a fresh folder renamed into place when whole: files.staged_dir)."""
    with staged_dir(dest) as tmp, tarfile.open(tarball, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(_PREFIX)
                   and m.name[len(_PREFIX):].startswith(_NEEDED) and (m.isfile() or m.isdir())]
        if not any(m.name == _PREFIX + "convert_hf_to_gguf.py" for m in members):
            raise ExportError(f"{tarball} holds no {_PREFIX}convert_hf_to_gguf.py")
        for m in members:
            m.name = m.name[len(_PREFIX):]
        tar.extractall(tmp, members=members, filter="data")  # "data": no links out, no absolute paths
    return dest


def _pip_download(into: Path, say: Optional[Callable[[str], None]]) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    spec = f"{PIN['package']}=={PIN['version']}"
    if say:
        say(f"export: fetching llama.cpp's converter ({spec} source distribution) with pip ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
           "--dest", str(into), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    tarball = into / PIN["sdist"]
    if proc.returncode != 0 or not tarball.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        raise ExportError(f"could not download {spec}'s source distribution (which carries llama.cpp's converter) "
                          f"with pip: " + " | ".join(tail) + "; set export.converter to a local copy of "
                          f"{PIN['sdist']} or of its vendor/llama.cpp folder")
    return tarball


def _sdist_in(folder: Path) -> Optional[Path]:
    candidate = folder / PIN["sdist"]
    return candidate if candidate.is_file() else None


def locate_converter(setting: Optional[str], cache_dir, say: Optional[Callable[[str], None]] = None) -> Converter:
    """The converter to run: from export.converter when set, else the pinned sdist cached under cache_dir."""
    from runner.locks import exclusive

    cache_dir = Path(cache_dir)
    extracted = cache_dir / f"llama.cpp-{PIN['version']}"
    if setting:
        given = Path(os.path.expanduser(str(setting)))
        if given.is_file() and given.name == "convert_hf_to_gguf.py":
            return Converter(given.parent, f"export.converter={given}")
        if given.is_dir() and (given / "convert_hf_to_gguf.py").is_file():
            return Converter(given, f"export.converter={given}")
        tarball = given if given.is_file() else (_sdist_in(given) if given.is_dir() else None)
        if tarball is None:
            raise ExportError(f"export.converter={setting}: expected {PIN['sdist']}, a folder holding it, or a "
                              f"llama.cpp folder with convert_hf_to_gguf.py; found none of these")
        _check_pin(tarball)
        with exclusive(cache_dir / ".converter.lock"):
            if not (extracted / "convert_hf_to_gguf.py").is_file():
                _extract(tarball, extracted)
        return Converter(extracted, f"{PIN['sdist']} from {tarball.parent} (sha256 checked)")
    with exclusive(cache_dir / ".converter.lock"):
        if not (extracted / "convert_hf_to_gguf.py").is_file():
            tarball = _sdist_in(cache_dir / "download") or _pip_download(cache_dir / "download", say)
            _check_pin(tarball)
            _extract(tarball, extracted)
    return Converter(extracted, f"{PIN['sdist']} from the package registry (sha256 checked)")


def sdist_member(tarball, member: str, dest) -> Path:
    """One file of the pinned sdist's vendor/llama.cpp/ (e.g. models/ggml-vocab-phi-3.gguf), copied to dest."""
    name = _PREFIX + member
    with tarfile.open(tarball, "r:gz") as tar:
        src = tar.extractfile(name)
        if src is None:
            raise ExportError(f"{tarball} has no {name}")
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "wb") as out:
            shutil.copyfileobj(src, out)
    return dest


def supported_list(converter: Converter) -> List[str]:
    return sorted(converter.architectures())
