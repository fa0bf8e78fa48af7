"""The chat template as it leaves the project: without the training-only `{% generation %}` markers, and read
back into its parts (what wraps each role, the generation prompt, the default system prompt, the end-of-turn
tokens) so the GGUF, the Modelfile and the stop list all say the same thing.

The parts are found by rendering the template on probe chats with sentinel contents, not by parsing its Jinja:
any template of the usual shape (a fixed text before and after each message, by role) is read the same way, and
one of another shape is refused with a clear error rather than exported with a template that differs.
"""

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from runner.export.errors import ExportError

Render = Callable[[List[Dict[str, str]], bool], str]  # (messages, add_generation_prompt) -> prompt text

_MARKER = re.compile(r"\{%(-?)\s*(end)?generation\s*(-?)%\}")
ROLES = ("system", "user", "assistant")
_S = {"system": "\x01SYS{}\x02", "user": "\x01USR{}\x02", "assistant": "\x01AST{}\x02"}


def strip_generation_markers(template: str) -> str:
    """The template without {% generation %}/{% endgeneration %}. A marker with whitespace control ({%- ... -%})
    becomes an always-true `if` with the same control, so the rendered text does not change by a single space."""

    def swap(m: re.Match) -> str:
        left, end, right = m.group(1), m.group(2), m.group(3)
        if not left and not right:
            return ""
        return f"{{%{left} endif {right}%}}" if end else f"{{%{left} if true {right}%}}"

    return _MARKER.sub(swap, template)


@dataclass
class TemplateParts:
    head: str  # text before the first message (e.g. a BOS written by the template)
    prefix: Dict[str, str]  # role -> text before the message content
    suffix: Dict[str, str]  # role -> text after it
    generation_prompt: str
    default_system: Optional[str] = None  # what the template puts in when the chat has no system turn
    end_texts: List[str] = field(default_factory=list)  # special tokens that close an assistant turn
    footer: str = ""  # text after the last message when no generation prompt is asked for (e.g. an EOS)


def _jinja_render(template: str, special: Dict[str, str]) -> Render:
    """A stand-alone renderer with transformers' settings (used when no tokenizer is at hand)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ExportError(f"the chat template raised: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(template)
    return lambda messages, add_gen: compiled.render(messages=messages, add_generation_prompt=add_gen, **special)


def tokenizer_renderer(tokenizer, template: str) -> Render:
    return lambda messages, add_gen: tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_gen)


def _chat(*roles: str) -> List[Dict[str, str]]:
    return [{"role": r, "content": _S[r].format(i)} for i, r in enumerate(roles)]


def _between(text: str, a: str, b: str) -> str:
    i, j = text.index(a) + len(a), text.index(b)
    return text[i:j]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def analyse(render: Render, special_tokens: List[str]) -> TemplateParts:
    """Read the role wrappers off rendered probe chats; ExportError when the template has another shape.

    Handles the shapes the Phi family ships: a BOS written by the template, a footer (e.g. EOS) written only when
    no generation prompt is asked for, an assistant opening carried by the user turn (no separate generation
    prompt), and templates that drop system turns."""
    names = ("system", "user", "assistant", "user", "assistant")
    s0, u1, a2, u3, a4 = (_S[r].format(i) for i, r in enumerate(names))
    try:
        full = render(_chat(*names), False)
        open_ = render(_chat(*names[:4]), False)
        with_gen = render(_chat(*names[:4]), True)
        no_system = render(_chat("user", "assistant"), False)
    except ExportError:
        raise
    except Exception as exc:  # noqa: BLE001 - a template that cannot render the probes cannot be exported
        raise ExportError(f"the chat template does not render a plain system/user/assistant chat: "
                          f"{type(exc).__name__}: {exc}") from exc
    if not all(x in full for x in (u1, a2, u3, a4)):
        raise ExportError("the chat template drops user or assistant turns")
    shared = _common_prefix(open_, with_gen)
    if u3 not in shared:
        raise ExportError("the chat template's generation prompt is not appended after the last message")
    # Where the last user turn ends and the generation prompt (or footer) begins: the latest point both renderings
    # share that does not cut a special token in two (e.g. "<|assistant|>" vs "<|endoftext|>" share "<|"), else
    # an earlier one, whichever first gives parts that render every probe.
    error = ExportError("the chat template's generation prompt could not be told apart from its last turn")
    for cut in range(len(shared), shared.index(u3) + len(u3) - 1, -1):
        if _cuts_a_token(open_, cut, special_tokens) or _cuts_a_token(with_gen, cut, special_tokens):
            continue
        try:
            return _parts_at(render, special_tokens, full, no_system, open_[cut:], with_gen[cut:])
        except ExportError as exc:
            error = exc
    raise error


def _cuts_a_token(text: str, pos: int, tokens: List[str]) -> bool:
    for token in tokens:
        if not token:
            continue
        start = text.find(token, max(0, pos - len(token) + 1))
        while start != -1 and start < pos:
            if start < pos < start + len(token):
                return True
            start = text.find(token, start + 1)
    return False


def _parts_at(render: Render, special_tokens: List[str], full: str, no_system: str, footer: str,
              gen: str) -> TemplateParts:
    s0, u1, a2, u3, a4 = (_S[r].format(i) for i, r in enumerate(("system", "user", "assistant", "user",
                                                                  "assistant")))
    user_to_asst = _between(full, u1, a2)
    if not user_to_asst.endswith(gen):
        raise ExportError("the chat template's assistant turn does not start with its generation prompt")
    suffix = {"user": user_to_asst[: len(user_to_asst) - len(gen)]}
    prefix = {"assistant": gen}
    tail = full[full.index(a4) + len(a4):]
    if not tail.endswith(footer):
        raise ExportError("the chat template ends a chat differently after an assistant turn")
    suffix["assistant"] = tail[: len(tail) - len(footer)]
    asst_to_user = _between(full, a2, u3)
    if not asst_to_user.startswith(suffix["assistant"]):
        raise ExportError("the chat template closes assistant turns differently in the middle and at the end")
    prefix["user"] = asst_to_user[len(suffix["assistant"]):]
    head_user = no_system[: no_system.index(_S["user"].format(0))]
    if not head_user.endswith(prefix["user"]):
        raise ExportError("the chat template wraps the first user turn differently from later ones")
    before_user = head_user[: len(head_user) - len(prefix["user"])]
    default_system, head = None, before_user
    if s0 in full:
        sys_to_user = _between(full, s0, u1)
        if not sys_to_user.endswith(prefix["user"]):
            raise ExportError("the chat template's user prefix differs after a system turn")
        suffix["system"] = sys_to_user[: len(sys_to_user) - len(prefix["user"])]
        head_sys = full[: full.index(s0)]
        if head_sys and before_user.startswith(head_sys) and before_user.endswith(suffix["system"]) and \
                len(before_user) > len(head_sys) + len(suffix["system"]):
            head, prefix["system"] = "", head_sys
            default_system = before_user[len(head_sys): len(before_user) - len(suffix["system"])]
        elif head_sys.startswith(before_user):
            prefix["system"] = head_sys[len(before_user):]
        else:
            raise ExportError("the chat template's opening text depends on the messages in a way this exporter "
                              "cannot express")
    else:  # the template drops system turns: so does the Modelfile
        prefix["system"] = suffix["system"] = None
    ends = [t for t in special_tokens if t and t in suffix["assistant"]]
    parts = TemplateParts(head=head, prefix=prefix, suffix=suffix, generation_prompt=gen,
                          default_system=default_system, end_texts=ends, footer=footer)
    _check_parts(parts, render)
    return parts


def render_parts(parts: TemplateParts, messages: List[Dict[str, str]], add_generation_prompt: bool) -> str:
    """The prompt the parts describe (the reference the Go template is checked against, too)."""
    out = [parts.head]
    if parts.default_system is not None and not any(m["role"] == "system" for m in messages) and \
            parts.prefix["system"] is not None:
        out.append(parts.prefix["system"] + parts.default_system + parts.suffix["system"])
    for m in messages:
        if parts.prefix[m["role"]] is not None:
            out.append(parts.prefix[m["role"]] + m["content"] + parts.suffix[m["role"]])
    out.append(parts.generation_prompt if add_generation_prompt else parts.footer)
    return "".join(out)


PROBE_CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}],
    [{"role": "user", "content": " lead space"}, {"role": "assistant", "content": "ok "},
     {"role": "user", "content": "again"}],
]


def _check_parts(parts: TemplateParts, render: Render) -> None:
    for chat in PROBE_CHATS:
        for gen in (True, False):
            if render_parts(parts, chat, gen) != render(chat, gen):
                raise ExportError("the chat template is not a fixed text around each message (it renders "
                                  f"{chat!r} differently from its role wrappers), so no Ollama TEMPLATE "
                                  "equivalent to it can be written")


def end_tokens(parts: TemplateParts, eos_token: Optional[str], generation_eos: List[str]) -> List[str]:
    """The texts that end an assistant turn: the template's closing special tokens first, then the tokenizer's
    EOS and generation_config's eos ids (deduplicated, order kept)."""
    seen: List[str] = []
    for t in [*parts.end_texts, eos_token, *generation_eos]:
        if t and t not in seen:
            seen.append(t)
    return seen
