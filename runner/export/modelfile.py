"""The Ollama Modelfile beside a GGUF: FROM, an explicit TEMPLATE equal to the chat template, one PARAMETER stop
per end-of-turn token and the template's default system prompt. Ollama's own guess of a template from GGUF
metadata is what makes exported models ramble; an explicit TEMPLATE and stop list leave nothing to guess."""

import re
import shlex
from pathlib import Path
from typing import Dict, List

from runner.export.chat_template import PROBE_CHATS, Render, TemplateParts
from runner.export.errors import ExportError
from runner.export.files import staged_file
from runner.export.gotemplate import ollama_template, render_ollama

_BLOCK = re.compile(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER)\s+(?:"""(.*?)"""|(.*?))\s*$', re.S | re.M)


def _triple(text: str, what: str) -> str:
    if '"""' in text:
        raise ExportError(f'the {what} holds """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def _quoted(text: str) -> str:
    if '"' in text or "\n" in text:
        raise ExportError(f"the stop token {text!r} cannot be written as a Modelfile PARAMETER")
    return f'"{text}"'


def ollama_name(name: str) -> str:
    """A model name Ollama accepts: lower case letters, digits, '.', '_' and '-'."""
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")
    return cleaned or "exported-model"


def modelfile_text(gguf_name: str, parts: TemplateParts, stops: List[str], source: str = "") -> str:
    lines = [f"# Written by chat-finetune-runner{(' from ' + source) if source else ''}.",
             f"FROM ./{gguf_name}",
             f"TEMPLATE {_triple(ollama_template(parts), 'chat template')}"]
    lines += [f"PARAMETER stop {_quoted(s)}" for s in stops]
    if parts.default_system is not None:
        lines.append(f"SYSTEM {_triple(parts.default_system, 'default system prompt')}")
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> Dict[str, object]:
    """The instructions written above, read back (FROM, TEMPLATE, SYSTEM, and the list of stops)."""
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    out: Dict[str, object] = {"stop": []}
    for m in _BLOCK.finditer(body):
        key, value = m.group(1), m.group(2) if m.group(2) is not None else m.group(3)
        if key == "PARAMETER":
            name, _, arg = value.partition(" ")
            if name == "stop":
                out["stop"].append(arg.strip().strip('"'))
        else:
            out[key] = value
    return out


def check_modelfile(path, jinja_render: Render, gguf_name: str, stops: List[str]) -> None:
    """Read the Modelfile back and render its TEMPLATE as Ollama would, on the probe chats; it must give the
    Jinja template's prompt text exactly."""
    parsed = parse_modelfile(Path(path).read_text(encoding="utf-8"))
    if parsed.get("FROM") != f"./{gguf_name}":
        raise ExportError(f"the Modelfile's FROM is {parsed.get('FROM')!r}, not ./{gguf_name}")
    if parsed["stop"] != stops:
        raise ExportError(f"the Modelfile's stops read back as {parsed['stop']}, not {stops}")
    for chat in PROBE_CHATS:
        ours = render_ollama(str(parsed["TEMPLATE"]), chat, parsed.get("SYSTEM"))
        if ours != jinja_render(chat, True):
            raise ExportError(f"the Modelfile TEMPLATE renders {chat!r} differently from the chat template")


def write_modelfile(folder, gguf_path, parts: TemplateParts, stops: List[str], jinja_render: Render,
                    model_name: str, source: str = "") -> Dict[str, str]:
    """Modelfile next to the GGUF (written, checked, renamed) and the command that creates the Ollama model."""
    folder, gguf_path = Path(folder), Path(gguf_path)
    if gguf_path.parent.resolve() != folder.resolve():
        raise ExportError("the Modelfile must sit beside its GGUF (FROM is a relative path)")
    text = modelfile_text(gguf_path.name, parts, stops, source)
    final = folder / "Modelfile"
    with staged_file(final, verify=lambda p: check_modelfile(p, jinja_render, gguf_path.name, stops)) as tmp:
        tmp.write_text(text, encoding="utf-8")
    command = f"ollama create {ollama_name(model_name)} -f {shlex.quote(str(final))}"
    return {"path": str(final), "command": command, "model": ollama_name(model_name)}
