"""export_model: every requested format of one model folder, in order: merged, then each GGUF (through a view
of the merged folder that carries the export's chat template and tokenizer settings), then the Modelfile beside
the GGUF. Everything that can be refused (format names, the model folder, the architecture, the llama.cpp
library for q4_k_m, disk space) is checked before the first byte is written.
"""

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

from runner.atomic import write_json
from runner.export import chat_template as ct
from runner.export.errors import ExportError
from runner.export.formats import DEFAULT_FORMATS, FORMATS, format_errors  # noqa: F401 - FORMATS re-exported
from runner.export.files import describe, human_size, tree_size
from runner.export.gguf import GGUF_FORMATS, conversion_view, export_gguf, gguf_filename, llama_cpp_library, \
    tokenizer_habits
from runner.export.merged import copy_merged, is_adapter_dir, merge_adapter_dir
from runner.export.modelfile import write_modelfile
# The Modelfile goes beside the smallest GGUF exported (what people run in Ollama).
_OLLAMA_PREFERENCE = ("gguf_q4_k_m", "gguf_q8_0", "gguf_f16")
RECORD = "export.json"


def check_formats(formats) -> List[str]:
    errors = format_errors(formats)
    if errors:
        raise ExportError(errors[0])
    return list(dict.fromkeys(formats))


def _source_config(model_dir: Path, base_dir: Optional[str]) -> Dict:
    if (model_dir / "config.json").is_file():
        return json.loads((model_dir / "config.json").read_text())
    base = base_dir or json.loads((model_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if base and (Path(base) / "config.json").is_file():
        return json.loads((Path(base) / "config.json").read_text())
    raise ExportError(f"the adapter in {model_dir} names no local base model folder ({base!r})")


def check_source(model_dir) -> Path:
    """The folder of a trained model: a plain transformers model or a LoRA adapter."""
    model_dir = Path(model_dir) if model_dir else None
    if model_dir is None or not model_dir.is_dir():
        raise ExportError(f"there is no trained model to export at {model_dir}: the run never trained or "
                          f"registered one (train it first, or point export.model at a registered version)")
    plain = (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))
    if not plain and not is_adapter_dir(model_dir):
        raise ExportError(f"{model_dir} holds no trained model (neither config.json with safetensors weights nor a "
                          f"LoRA adapter_config.json): the run never finished training or registering")
    return model_dir


def _n_params(config: Dict, folder: Path) -> int:
    """Parameters, from the weight bytes (2 bytes each at 16 bit, 4 at 32) for the space estimate."""
    size = tree_size(folder)
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return size // (4 if "32" in dtype else 2)


def _template_and_ends(tokenizer, merged_dir: Path):
    template = tokenizer.chat_template
    if not template:
        raise ExportError(f"the model in {merged_dir} has no chat template, so the GGUF and the Modelfile would "
                          f"not know how to format a chat")
    template = ct.strip_generation_markers(template)
    specials = list(dict.fromkeys([*tokenizer.all_special_tokens, *tokenizer.get_added_vocab()]))
    parts = ct.analyse(ct.tokenizer_renderer(tokenizer, template), specials)
    gen_eos = _generation_eos(tokenizer, merged_dir)
    ends = ct.end_tokens(parts, tokenizer.eos_token, gen_eos)
    return template, parts, ends


def _generation_eos(tokenizer, folder: Path) -> List[str]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return []
    ids = json.loads(path.read_text()).get("eos_token_id")
    ids = ids if isinstance(ids, list) else [ids] if ids is not None else []
    return [tokenizer.convert_ids_to_tokens(int(i)) for i in ids]


def export_model(model_dir, out_dir, formats=DEFAULT_FORMATS, *, name: str, converter: Optional[str] = None,
                 cache_dir=None, base_dir: Optional[str] = None, check_chats: Optional[List[List[Dict]]] = None,
                 say: Callable[[str], None] = print) -> Dict:
    """Export the model in model_dir as formats under out_dir; returns (and writes to out_dir/export.json) the
    outputs' paths, sizes and sha256, the end tokens and the `ollama create` command. check_chats (held-out chats
    ending in an assistant turn): each GGUF is compared with the merged model in llama.cpp (where llama-cpp-python
    is installed) and the figures recorded under "checks"."""
    formats = check_formats(formats)
    model_dir, out_dir = check_source(model_dir), Path(out_dir)
    config = _source_config(model_dir, base_dir)
    ggufs = [f for f in formats if f in GGUF_FORMATS]
    conv = None
    if ggufs:
        from runner.export.converter import locate_converter

        if "gguf_q4_k_m" in ggufs:
            llama_cpp_library()
        conv = locate_converter(converter, cache_dir or out_dir / ".cache", say)
        conv.check_architecture(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-work-", dir=out_dir))
    record: Dict = {"source": str(model_dir), "formats": formats, "outputs": {}}
    try:
        merged_dir = out_dir / "merged" if "merged" in formats else work / "merged"
        if is_adapter_dir(model_dir):
            say(f"export: merging the LoRA adapter in {model_dir} into its base model ...")
            merge_adapter_dir(model_dir, merged_dir, base_dir)
        elif "merged" in formats:
            copy_merged(model_dir, merged_dir, base_dir)
        else:
            merged_dir = model_dir  # already a plain model: convert from it directly
        if "merged" in formats:
            record["outputs"]["merged"] = describe(merged_dir)
        if ggufs:
            extra = _export_ggufs(merged_dir, out_dir / "gguf", ggufs, conv, work, config, name, say, base_dir)
            record["outputs"].update(extra.pop("outputs"))
            record.update(extra)
        record["converter"] = conv.origin if conv else None
        if ggufs and check_chats:
            record["checks"] = _check_ggufs(merged_dir, record["outputs"], check_chats,
                                            record["chat_template"]["end_tokens"], say)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_json(out_dir / RECORD, record)
    for fmt, info in record["outputs"].items():
        say(f"export: {fmt:<12} {info['path']}  ({human_size(info['bytes'])})")
    if record.get("ollama"):
        say(f"export: Ollama: {record['ollama']['command']}")
    return record


def _check_ggufs(merged_dir: Path, outputs: Dict, chats: List[List[Dict]], end_tokens: List[str],
                 say: Callable[[str], None]) -> Dict:
    """llama.cpp against transformers on held-out chats, per GGUF (runner/export/checks.py)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        say("export: llama-cpp-python is not installed; the GGUFs were not re-checked in llama.cpp")
        return {"skipped": "llama-cpp-python not installed"}
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runner.export.checks import compare, load_gguf

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    checks = {}
    for fmt, info in outputs.items():
        if fmt in GGUF_FORMATS:
            llm = load_gguf(info["path"])
            report = compare(llm, model, tokenizer, chats, end_tokens=end_tokens).as_dict()
            checks[fmt] = report
            same = "same" if not report["tokenization_mismatches"] else "DIFFERS"
            say(f"export: llama.cpp check {fmt}: tokenization {same}, argmax agreement {report['agreement']:.1%} "
                f"of {report['positions']} assistant positions, {report['stopped']}/{report['chats']} greedy "
                f"replies stopped on the end token")
    return checks


def _export_ggufs(merged_dir: Path, gguf_dir: Path, ggufs: List[str], conv, work: Path, config: Dict, name: str,
                  say: Callable[[str], None], base_dir: Optional[str] = None) -> Dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    template, parts, ends = _template_and_ends(tokenizer, merged_dir)
    end_token = ends[0]
    end_id = tokenizer.convert_tokens_to_ids(end_token)
    habits = tokenizer_habits(tokenizer)
    view = conversion_view(merged_dir, work / "view", template, end_token, tokenizer, base_dir)
    n_params = _n_params(config, merged_dir)
    outputs, paths = {}, {}
    for fmt in ggufs:
        path = export_gguf(view, gguf_dir / gguf_filename(name, fmt), fmt, conv, template=template,
                           end_token_id=end_id, habits=habits, work_dir=work, n_params=n_params, say=say)
        outputs[fmt], paths[fmt] = describe(path), path
    chosen = next(f for f in _OLLAMA_PREFERENCE if f in paths)
    render = ct.tokenizer_renderer(tokenizer, template)
    ollama = write_modelfile(gguf_dir, paths[chosen], parts, ends, render, name, source=str(merged_dir))
    ollama["gguf"] = str(paths[chosen])
    return {"outputs": outputs, "ollama": ollama, "chat_template": {
        "end_tokens": ends, "default_system": parts.default_system, "tokenizer": habits}}
