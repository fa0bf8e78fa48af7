"""Preparation for the local trainer: chat JSONL -> token ids + assistant-only labels, cached on disk.

Each conversation goes through the model's own chat template. Labels are -100 everywhere except the tokens the
assistant wrote (its content and the end-of-turn token that closes it), so the loss teaches answering, not
parroting prompts. Sequences are cut to max_seq_length (head kept); a row left with no assistant token is dropped,
since it would only cost compute.

Tokenizing is paid once: the result is stored under cache_dir keyed by (data sha256, tokenizer fingerprint,
chat template, max_seq_length), so a second run with the same inputs loads it instead of tokenizing again.
Only `messages` is read: other columns (ultrachat's `prompt`/`prompt_id`, a user's own) never reach a trainer (TRL would take a string
`prompt` column for prompt-completion data and fail).
"""

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from runner.atomic import sha256_file, staged_dir
from runner.errors import RunnerError

PREPARE_VERSION = 1  # bump when the recipe changes, so stale caches are not reused
IGNORE_INDEX = -100
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
_UNLIMITED = 10**8  # tokenizers without model_max_length report ~1e30


def _chat_template(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is used
        template = template.get("default") or next(iter(template.values()))
    if not template:
        raise RunnerError("the tokenizer has no chat template: a chat model's tokenizer (tokenizer_config.json "
                          "'chat_template' or chat_template.jinja) is needed to prepare chat data")
    return template


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the token ids: the vocabulary/merges/normalisation, special tokens, chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:  # slow tokenizer: its vocabulary is the best stand-in
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(_chat_template(tokenizer).encode())
    return digest.hexdigest()


def effective_max_length(tokenizer, max_seq_length: int) -> Optional[int]:
    """max_seq_length <= 0 means the tokenizer's model_max_length (None when that is unset/unlimited)."""
    if max_seq_length and max_seq_length > 0:
        return int(max_seq_length)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < _UNLIMITED else None


def cache_key(data_sha256: str, tokenizer, max_seq_length: Optional[int]) -> str:
    identity = {
        "version": PREPARE_VERSION,
        "data": data_sha256,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": hashlib.sha256(_chat_template(tokenizer).encode()).hexdigest(),
        "max_seq_length": max_seq_length,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


# ---- one conversation ----------------------------------------------------------------------------------------

def _mask_by_generation_tags(messages, tokenizer) -> Tuple[List[int], List[int]]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def _mask_by_offsets(messages, tokenizer) -> Tuple[List[int], List[int]]:
    """For templates without {% generation %} tags: render the conversation up to each assistant turn and mark
    the characters that turn adds (content and end-of-turn token, not the role header), then map characters to
    tokens through the offsets of the full text."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(before) and text.startswith(through)):
            raise RunnerError("the chat template does not render conversations prefix by prefix, so assistant "
                              "tokens cannot be located; add {% generation %} tags around assistant content")
        spans.append((len(before), len(through.rstrip())))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= start < e for s, e in spans)) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def tokenize_conversation(messages: List[Dict[str, str]], tokenizer, max_length: Optional[int]) -> Dict[str, Any]:
    """input_ids and labels (assistant tokens only) of one conversation, cut to max_length."""
    if _GENERATION_TAG.search(_chat_template(tokenizer)):
        ids, mask = _mask_by_generation_tags(messages, tokenizer)
    else:
        ids, mask = _mask_by_offsets(messages, tokenizer)
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels, "truncated": truncated}


# ---- a file --------------------------------------------------------------------------------------------------

def _read_conversations(jsonl_path: Path) -> List[Tuple[int, List[Dict[str, str]]]]:
    rows = []
    with open(jsonl_path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RunnerError(f"{jsonl_path}:{lineno}: not valid JSON ({exc.msg}); each line must be one "
                                  f"messages row (the data step writes them)") from None
            messages = row.get("messages") if isinstance(row, dict) else None
            if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            ):
                raise RunnerError(f"{jsonl_path}:{lineno}: 'messages' must be a non-empty list of "
                                  f"{{'role': str, 'content': str}}; run the data step's validation first")
            rows.append((lineno, [{"role": m["role"], "content": m["content"]} for m in messages]))
    return rows


def _tokenize_rows(rows, tokenizer, max_length, progress: bool, desc: str) -> Tuple[Dict[str, list], Dict[str, int]]:
    from tqdm.auto import tqdm

    columns: Dict[str, list] = {"input_ids": [], "labels": []}
    stats = {"rows_in": len(rows), "rows": 0, "truncated": 0, "dropped_no_assistant": 0, "tokens": 0,
             "assistant_tokens": 0}
    for _lineno, messages in tqdm(rows, desc=desc, unit="conv", disable=not progress, leave=False):
        out = tokenize_conversation(messages, tokenizer, max_length)
        n_assistant = sum(1 for x in out["labels"] if x != IGNORE_INDEX)
        if n_assistant == 0:  # nothing to learn from (no assistant turn, or it was cut off entirely)
            stats["dropped_no_assistant"] += 1
            continue
        columns["input_ids"].append(out["input_ids"])
        columns["labels"].append(out["labels"])
        stats["rows"] += 1
        stats["truncated"] += int(out["truncated"])
        stats["tokens"] += len(out["input_ids"])
        stats["assistant_tokens"] += n_assistant
    return columns, stats


def _quietly(fn, *args):
    """datasets' own progress bars for saving/loading a few MB are noise next to ours."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        return fn(*args)
    finally:
        if was_enabled:
            ds_logging.enable_progress_bar()


def tokenize_file_with_stats(jsonl_path, tokenizer, max_seq_length: int, *, cache_dir=None,
                             progress: bool = True):
    """(datasets.Dataset with input_ids/labels, stats dict incl. 'cache_hit' and 'cache_path')."""
    import datasets

    jsonl_path = Path(jsonl_path)
    if not jsonl_path.is_file():
        raise RunnerError(f"data file not found: {jsonl_path}")
    max_length = effective_max_length(tokenizer, max_seq_length)
    key = cache_key(sha256_file(jsonl_path), tokenizer, max_length)
    final = Path(cache_dir) / key if cache_dir else None
    if final is not None and (final / "meta.json").is_file():
        stats = json.loads((final / "meta.json").read_text())
        return _quietly(datasets.load_from_disk, str(final / "data")), {**stats, "cache_hit": True, "cache_path": str(final)}

    rows = _read_conversations(jsonl_path)
    columns, stats = _tokenize_rows(rows, tokenizer, max_length, progress, desc=f"tokenize {jsonl_path.name}")
    stats.update(max_seq_length=max_length, source=str(jsonl_path), key=key)
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "labels": datasets.Sequence(datasets.Value("int32"))})
    dataset = datasets.Dataset.from_dict(columns, features=features)
    if final is None or not len(dataset):  # datasets cannot load back a saved empty table; nothing to cache
        return dataset, {**stats, "cache_hit": False, "cache_path": None}

    # Written complete or not at all (meta.json last marks it usable); another process that cached the same key
    # meanwhile wrote the same thing: theirs is kept.
    with staged_dir(final, keep_existing=True) as tmp:
        _quietly(dataset.save_to_disk, str(tmp / "data"))
        (tmp / "meta.json").write_text(json.dumps(stats, indent=1))
    return _quietly(datasets.load_from_disk, str(final / "data")), {**stats, "cache_hit": False, "cache_path": str(final)}


def tokenize_file(jsonl_path, tokenizer, max_seq_length: int, *, cache_dir=None, progress: bool = True):
    """The tokenized dataset (columns input_ids, labels) of a chat JSONL file; see the module docstring."""
    return tokenize_file_with_stats(jsonl_path, tokenizer, max_seq_length, cache_dir=cache_dir,
                                    progress=progress)[0]
