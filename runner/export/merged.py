"""The merged model: LoRA folded into the base weights, saved as a plain transformers model (safetensors) with
everything a runtime needs beside it: the tokenizer (with the base's tokenizer.model, which transformers does not
always write back), generation_config.json and the chat template. The fine-tune step's final save and the export
both go through save_merged, so there is one merge, not two.
"""

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

from runner.export.errors import ExportError
from runner.export.files import check_free_space, staged_dir, tree_size

# Tokenizer files a save_pretrained may leave out but converters and runtimes read (llama.cpp's converter needs
# tokenizer.model for SentencePiece models such as Phi-3-mini).
SIDE_FILES = ("tokenizer.model",)
WEIGHT_GLOBS = ("*.safetensors",)


def is_adapter_dir(path) -> bool:
    return (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file()


def copy_side_files(source_dir, dest) -> None:
    if not source_dir:
        return
    for name in SIDE_FILES:
        src, dst = Path(source_dir) / name, Path(dest) / name
        if src.is_file() and not dst.exists():
            shutil.copy2(src, dst)


def check_merged_dir(path, require_chat_template: bool = True) -> None:
    """What a runtime needs is present: config, safetensors weights, a tokenizer, generation config and (for an
    export) a chat template (file or tokenizer_config entry)."""
    path = Path(path)
    required = ("config.json", "generation_config.json", "tokenizer_config.json")
    missing = [n for n in required if not (path / n).is_file()]
    if not any(path.glob("*.safetensors")):
        missing.append("*.safetensors")
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        missing.append("tokenizer.json or tokenizer.model")
    config = path / "tokenizer_config.json"
    has_template = (path / "chat_template.jinja").is_file() or (
        config.is_file() and "chat_template" in json.loads(config.read_text(encoding="utf-8")))
    if require_chat_template and not has_template:
        missing.append("chat template")
    if missing:
        raise ExportError(f"the merged model in {path} lacks {', '.join(missing)}")


def _ensure_generation_config(model, dest: Path) -> None:
    if (dest / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    GenerationConfig.from_model_config(model.config).save_pretrained(dest)


def save_merged(model, tokenizer, final_dir, *, source_dir=None, state_dict=None,
                require_chat_template: bool = False) -> Dict[str, Any]:
    """Merge (when model is a PEFT model) and save model + tokenizer into final_dir, written to a temporary folder
    beside it, checked, then renamed. source_dir is the base model's folder, for its tokenizer side files
    (default: where the tokenizer was loaded from). A caller that trained with its own attention kernel sets a
    standard one first (the local trainer does), so the saved model loads anywhere."""
    merged_lora = hasattr(model, "merge_and_unload") and hasattr(model, "peft_config")
    if merged_lora:
        model = model.merge_and_unload()
    model.config.use_cache = True
    source_dir = source_dir or getattr(tokenizer, "name_or_path", None)
    with staged_dir(final_dir, verify=lambda p: check_merged_dir(p, require_chat_template)) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        copy_side_files(source_dir if source_dir and Path(source_dir).is_dir() else None, tmp)
        _ensure_generation_config(model, tmp)
        if getattr(tokenizer, "chat_template", None) and not (tmp / "chat_template.jinja").is_file():
            (tmp / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
    return {"merged_dir": str(final_dir), "lora_merged": merged_lora}


def merge_adapter_dir(adapter_dir, final_dir, base_dir: Optional[str] = None) -> Dict[str, Any]:
    """A saved LoRA adapter (adapter_config.json + weights) merged into its base model, in fp32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = Path(adapter_dir)
    base = base_dir or json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    if not base or not Path(base).is_dir():
        raise ExportError(f"the adapter in {adapter_dir} was trained on {base!r}, which is not a local folder; "
                          f"pass the base model's folder")
    check_free_space(Path(final_dir).parent, 2 * tree_size(base), "the merged model")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    tok_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else Path(base)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    return save_merged(model, tokenizer, final_dir, source_dir=base, require_chat_template=True)


def copy_merged(model_dir, final_dir, base_dir: Optional[str] = None) -> Dict[str, Any]:
    """An already merged (plain) model folder copied as the `merged` export, with missing side files added from
    the base model's folder when known."""
    model_dir = Path(model_dir)
    check_free_space(Path(final_dir).parent, tree_size(model_dir), "the merged model")
    with staged_dir(final_dir, verify=check_merged_dir) as tmp:
        for item in model_dir.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        copy_side_files(base_dir, tmp)
        if not (tmp / "generation_config.json").is_file():
            from transformers import AutoConfig, GenerationConfig

            GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir)).save_pretrained(tmp)
    return {"merged_dir": str(final_dir), "lora_merged": None}
