"""The Ollama TEMPLATE (Go text/template syntax) for a chat template's parts, and a renderer for exactly the
subset written here, so every Modelfile is checked against the Jinja rendering before it is saved.

Supported: text, {{ .Field }}, {{ "literal" }}, {{ $v := pipeline }}, {{ range $i, $_ := .Messages }},
{{ if }}/{{ else if }}/{{ else }}/{{ end }}, the functions eq, ne, not, and, or, len, slice, and {{- / -}} trim
markers. Anything else raises: the renderer must never accept what Ollama would read differently.
"""

import re
from typing import Any, Dict, List, Tuple

from runner.export.chat_template import TemplateParts

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r'\(|\)|"(?:\\.|[^"\\])*"|[^\s()]+')


def _literal(text: str) -> str:
    """Template text as is, unless it holds template delimiters (then a quoted Go string)."""
    if "{{" in text or "}}" in text:
        return "{{ " + _go_quote(text) + " }}"
    return text


def _go_quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t") + '"'


def ollama_template(parts: TemplateParts) -> str:
    """One .Messages loop: each message between its role's prefix and suffix; after a last user message, the
    generation prompt; a last assistant message is left open (Ollama continues it); system turns are dropped
    where the chat template drops them. Ollama itself puts the
    Modelfile's SYSTEM in front of the messages when the request has no system message."""
    p, s = parts.prefix, parts.suffix
    system = "" if p["system"] is None else _literal(p["system"]) + "{{ .Content }}" + _literal(s["system"])
    return (
        _literal(parts.head)
        + "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        + '{{ if eq .Role "system" }}' + system
        + '{{ else if eq .Role "user" }}' + _literal(p["user"]) + "{{ .Content }}" + _literal(s["user"])
        + "{{ if $last }}" + _literal(parts.generation_prompt) + "{{ end }}"
        + '{{ else if eq .Role "assistant" }}' + _literal(p["assistant"]) + "{{ .Content }}"
        + "{{ if not $last }}" + _literal(s["assistant"]) + "{{ end }}"
        + "{{ end }}{{ end }}"
    )


# ---- the renderer ----------------------------------------------------------------------------------------------

class GoTemplateError(ValueError):
    pass


def _lex(template: str) -> List[Tuple[str, str]]:
    """[("text", s) | ("action", body)] with trim markers applied to the neighbouring text."""
    items: List[Tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        items.append(("text", text))
        items.append(("action", m.group(2).strip()))
        trim_next, pos = bool(m.group(3)), m.end()
    tail = template[pos:]
    items.append(("text", tail.lstrip(" \t\r\n") if trim_next else tail))
    return items


def _parse(items, i=0, stop=("end",)):
    """Nodes until an action in stop; returns (nodes, index of the stopping action)."""
    nodes: List[Any] = []
    while i < len(items):
        kind, body = items[i]
        if kind == "text":
            if body:
                nodes.append(("text", body))
            i += 1
            continue
        word = body.split(None, 1)[0] if body else ""
        if word in ("end", "else") and word in stop or body.startswith("else if") and "else" in stop:
            return nodes, i
        if word == "if":
            node, i = _parse_if(items, i, body[2:].strip())
            nodes.append(node)
        elif word == "range":
            m = re.fullmatch(r"range\s+(?:(\$\w+)\s*,\s*(\$\w+)\s*:=\s*)?(.+)", body, re.S)
            if not m:
                raise GoTemplateError(f"unsupported range: {body!r}")
            inner, j = _parse(items, i + 1, ("end",))
            nodes.append(("range", m.group(1), m.group(2), _expr(m.group(3)), inner))
            i = j + 1
        elif re.match(r"\$\w+\s*:=", body):
            name, expr = body.split(":=", 1)
            nodes.append(("set", name.strip(), _expr(expr)))
            i += 1
        else:
            nodes.append(("print", _expr(body)))
            i += 1
    if stop != ():
        raise GoTemplateError("missing {{ end }}")
    return nodes, i


def _parse_if(items, i, cond):
    branches = []
    body, j = _parse(items, i + 1, ("end", "else"))
    branches.append((_expr(cond), body))
    while True:
        action = items[j][1]
        if action == "end":
            return ("if", branches, []), j + 1
        if action.startswith("else if"):
            body, k = _parse(items, j + 1, ("end", "else"))
            branches.append((_expr(action[len("else if"):].strip()), body))
            j = k
        elif action == "else":
            body, k = _parse(items, j + 1, ("end",))
            return ("if", branches, body), k + 1
        else:
            raise GoTemplateError(f"unexpected {{{{ {action} }}}}")


def _expr(text: str):
    tokens = _TOKEN.findall(text)
    node, rest = _pipeline(tokens)
    if rest:
        raise GoTemplateError(f"cannot parse {text!r}")
    return node


def _pipeline(tokens):
    args = []
    while tokens and tokens[0] != ")":
        tok, tokens = tokens[0], tokens[1:]
        if tok == "(":
            node, tokens = _pipeline(tokens)
            if not tokens or tokens[0] != ")":
                raise GoTemplateError("unbalanced parenthesis")
            tokens = tokens[1:]
            args.append(node)
        else:
            args.append(("atom", tok))
    if not args:
        raise GoTemplateError("empty expression")
    return (args[0] if len(args) == 1 else ("call", args)), tokens


_FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truth(a),
    "and": lambda *a: next((x for x in a if not _truth(x)), a[-1]),
    "or": lambda *a: next((x for x in a if _truth(x)), a[-1]),
    "len": lambda a: len(a),
    "slice": lambda a, *ix: a[ix[0]:] if len(ix) == 1 else a[ix[0]:ix[1]],
}


def _truth(v) -> bool:
    return bool(v)


def _eval(node, dot, scope: Dict[str, Any]):
    if node[0] == "call":
        head, args = node[1][0], node[1][1:]
        if head[0] != "atom" or head[1] not in _FUNCS:
            raise GoTemplateError(f"unsupported function {head!r}")
        return _FUNCS[head[1]](*[_eval(a, dot, scope) for a in args])
    tok = node[1]
    if tok.startswith('"'):
        return bytes(tok[1:-1], "utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")
    if re.fullmatch(r"-?\d+", tok):
        return int(tok)
    if tok.startswith("$."):
        return _field(scope["$"], tok[2:])
    if tok.startswith("$"):
        if tok not in scope:
            raise GoTemplateError(f"undefined variable {tok}")
        return scope[tok]
    if tok.startswith("."):
        return dot if tok == "." else _field(dot, tok[1:])
    if tok in ("true", "false"):
        return tok == "true"
    raise GoTemplateError(f"unsupported term {tok!r}")


def _field(obj, path: str):
    for name in path.split("."):
        if not isinstance(obj, dict) or name not in obj:
            raise GoTemplateError(f"no field {name!r}")
        obj = obj[name]
    return obj


def _run(nodes, dot, scope, out: List[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "print":
            value = _eval(node[1], dot, scope)
            out.append(value if isinstance(value, str) else str(value))
        elif kind == "set":
            scope[node[1]] = _eval(node[2], dot, scope)
        elif kind == "if":
            for cond, body in node[1]:
                if _truth(_eval(cond, dot, scope)):
                    _run(body, dot, dict(scope), out)
                    break
            else:
                _run(node[2], dot, dict(scope), out)
        elif kind == "range":
            _, ivar, evar, expr, body = node
            for i, item in enumerate(_eval(expr, dot, scope)):
                inner = dict(scope)
                if ivar:
                    inner[ivar], inner[evar] = i, item
                _run(body, item, inner, out)


def render(template: str, data: Dict[str, Any]) -> str:
    """Render the supported subset with data (e.g. {"Messages": [{"Role": ..., "Content": ...}]})."""
    nodes, _ = _parse(_lex(template), 0, ())
    out: List[str] = []
    _run(nodes, data, {"$": data}, out)
    return "".join(out)


def render_ollama(template: str, messages: List[Dict[str, str]], system: str = None) -> str:
    """What Ollama renders for a chat request: the Modelfile SYSTEM goes first when the chat has no system turn."""
    msgs = [{"Role": m["role"], "Content": m["content"]} for m in messages]
    if system is not None and not any(m["Role"] == "system" for m in msgs):
        msgs.insert(0, {"Role": "system", "Content": system})
    return render(template, {"Messages": msgs})
