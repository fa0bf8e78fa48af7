"""GGUF files through llama.cpp's own tools: its converter (f16, q8_0) and, for q4_k_m, the llama.cpp library's
quantizer (llama-cpp-python) applied to the f16 file. Each file is written under a temporary name, read back with
the `gguf` package (architecture, tensors, quantization, the embedded chat template and the end-of-turn token)
and only then renamed to its final name.
"""

import ctypes
import json
import os
from pathlib import Path
from typing import Callable, Dict, Optional

from runner.export.converter import Converter
from runner.export.errors import ExportError
from runner.export.formats import GGUF_OUTTYPES
from runner.export.files import check_free_space, staged_file
from runner.export.merged import copy_side_files

# format name -> (converter --outtype, llama.cpp file type id in general.file_type)
_FILE_TYPES = {"f16": 1, "q8_0": 7, "q4_k_m": 15}  # llama_ftype ids
GGUF_FORMATS: Dict[str, tuple] = {fmt: (outtype, _FILE_TYPES[outtype]) for fmt, outtype in GGUF_OUTTYPES.items()}
# bytes per parameter, for the free-space check (with the f16 intermediate for q4_k_m)
_BYTES_PER_PARAM = {"gguf_f16": 2.0, "gguf_q8_0": 1.07, "gguf_q4_k_m": 2.0 + 0.6}


def llama_cpp_library():
    """The llama.cpp Python binding, or an ExportError naming what to install."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        raise ExportError("gguf_q4_k_m needs the llama.cpp library to quantize (the `llama_cpp` module of "
                          "llama-cpp-python==0.3.36, installed by this project's `export` extra: pip install -e "
                          "'.[export]'); it is not installed. Export gguf_f16 or gguf_q8_0 instead, which need only "
                          "llama.cpp's converter") from exc
    return llama_cpp


def gguf_filename(name: str, fmt: str) -> str:
    return f"{name}-{GGUF_FORMATS[fmt][0]}.gguf"


def tokenizer_habits(tokenizer) -> Dict[str, bool]:
    """What the transformers tokenizer does to plain text: add BOS/EOS, put a space ("\u2581") before the text.
    llama.cpp is told the same, so both make the same ids."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("a", add_special_tokens=False)["input_ids"])
    return {"add_bos_token": bool(ids) and bos is not None and ids[0] == bos,
            "add_eos_token": bool(ids) and eos is not None and ids[-1] == eos,
            "add_space_prefix": bool(pieces) and pieces[0].startswith("\u2581")}


def conversion_view(merged_dir, into, template: str, end_token: str, tokenizer, base_dir=None) -> Path:
    """A folder of links to the merged model's files, with the tokenizer files the converter reads rewritten: the
    chat template without training markers, the end-of-turn token as EOS and the BOS/EOS habits of the
    transformers tokenizer (llama.cpp's SentencePiece default would add a BOS the model never saw)."""
    merged_dir, into = Path(merged_dir), Path(into)
    into.mkdir(parents=True, exist_ok=True)
    for item in merged_dir.iterdir():
        if item.is_file() and item.name not in ("tokenizer_config.json", "chat_template.jinja", "chat_template.json"):
            os.symlink(item.resolve(), into / item.name)
    cfg = json.loads((merged_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg.pop("chat_template", None)
    habits = tokenizer_habits(tokenizer)
    cfg.update(add_bos_token=habits["add_bos_token"], add_eos_token=habits["add_eos_token"], eos_token=end_token)
    (into / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
    (into / "chat_template.jinja").write_text(template, encoding="utf-8")
    copy_side_files(base_dir, into)  # e.g. the base's tokenizer.model, when an older save left it out
    return into


def read_metadata(path) -> Dict[str, object]:
    """The GGUF's key/value metadata (scalars and strings; arrays as their length) and its tensor types."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    meta: Dict[str, object] = {}
    for key, field in reader.fields.items():
        if key.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                           "tokenizer.ggml.merges")):
            meta[key] = len(field.data)
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # noqa: BLE001 - a field type the reader cannot decode is not one we check
            continue
    meta["_tensors"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return meta


def verify_gguf(path, *, file_type: int, template: str, end_token_id: int,
                habits: Dict[str, bool]) -> Dict[str, object]:
    meta = read_metadata(path)
    problems = []
    if not meta.get("_tensors"):
        problems.append("no tensors")
    if meta.get("general.file_type") != file_type:
        problems.append(f"general.file_type {meta.get('general.file_type')} (expected {file_type})")
    if meta.get("tokenizer.chat_template") != template:
        problems.append("the embedded chat template differs from the exported one")
    if "generation %}" in str(meta.get("tokenizer.chat_template", "")):
        problems.append("the chat template still holds {% generation %} markers")
    if meta.get("tokenizer.ggml.eos_token_id") != end_token_id:
        problems.append(f"tokenizer.ggml.eos_token_id {meta.get('tokenizer.ggml.eos_token_id')} is not the "
                        f"end-of-turn token {end_token_id}")
    for key, value in _metadata_fixes(meta, habits).items():
        problems.append(f"{key} would be {not value} in llama.cpp, transformers behaves as {value}")
    if problems:
        raise ExportError(f"the GGUF written to {path} failed its check: " + "; ".join(problems))
    return meta


def _metadata_fixes(meta: Dict[str, object], habits: Dict[str, bool]) -> Dict[str, bool]:
    """Tokenizer keys the converter left out or set otherwise than transformers behaves (llama.cpp's defaults for
    a SentencePiece vocabulary are: add a BOS, prepend a space)."""
    fixes: Dict[str, bool] = {}
    if meta.get("tokenizer.ggml.model") != "llama":
        return fixes
    if bool(meta.get("tokenizer.ggml.add_space_prefix", True)) != habits["add_space_prefix"]:
        fixes["tokenizer.ggml.add_space_prefix"] = habits["add_space_prefix"]
    if bool(meta.get("tokenizer.ggml.add_bos_token", True)) != habits["add_bos_token"]:
        fixes["tokenizer.ggml.add_bos_token"] = habits["add_bos_token"]
    return fixes


def apply_metadata_fixes(path, habits: Dict[str, bool], work_dir) -> Dict[str, bool]:
    """Rewrite the GGUF with corrected tokenizer keys through gguf-py's own copier (gguf_new_metadata)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    path = Path(path)
    fixes = _metadata_fixes(read_metadata(path), habits)
    if not fixes:
        return fixes
    reader = gguf.GGUFReader(str(path), "r")
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    fixed = Path(work_dir) / (path.name + ".fixed")
    writer = gguf.GGUFWriter(str(fixed), arch=arch, endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, {k: MetadataDetails(gguf.GGUFValueType.BOOL, v)
                                            for k, v in fixes.items()}, [])
    del reader
    os.replace(fixed, path)
    return fixes


def _quantize_q4_k_m(src: Path, dst: Path) -> None:
    llama_cpp = llama_cpp_library()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = max(1, (os.cpu_count() or 1))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ExportError(f"llama.cpp's quantizer failed (return code {rc}) making q4_k_m from {src.name}")


def export_gguf(view_dir, out_path, fmt: str, converter: Converter, *, template: str, end_token_id: int,
                habits: Dict[str, bool], work_dir, n_params: int,
                say: Optional[Callable[[str], None]] = None) -> Path:
    """One GGUF of the model in view_dir (see conversion_view) at out_path, verified before the rename."""
    if fmt not in GGUF_FORMATS:
        raise ExportError(f"unknown GGUF format {fmt!r}; known: {', '.join(GGUF_FORMATS)}")
    outtype, file_type = GGUF_FORMATS[fmt]
    out_path = Path(out_path)
    check_free_space(out_path.parent, int(n_params * _BYTES_PER_PARAM[fmt]), out_path.name)
    log = out_path.parent / "logs" / f"convert-{outtype}.log"  # kept: a failed conversion's whole story
    log.parent.mkdir(parents=True, exist_ok=True)

    def verify(p):
        verify_gguf(p, file_type=file_type, template=template, end_token_id=end_token_id, habits=habits)

    with staged_file(out_path, verify=verify) as tmp:
        if fmt == "gguf_q4_k_m":
            llama_cpp_library()  # refuse before converting anything
            f16 = Path(work_dir) / "intermediate-f16.gguf"
            converter.convert(view_dir, f16, "f16", log, say)
            apply_metadata_fixes(f16, habits, work_dir)
            try:
                _quantize_q4_k_m(f16, tmp)
            finally:
                f16.unlink(missing_ok=True)
        else:
            converter.convert(view_dir, tmp, outtype, log, say)
            apply_metadata_fixes(tmp, habits, work_dir)
    return out_path
