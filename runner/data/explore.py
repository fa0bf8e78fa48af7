"""What the data looks like before anything trains on it: rows per split, turns per conversation, characters and
(with the model's tokenizer) tokens per conversation, how many rows `finetune.max_seq_length` would truncate, role
counts and duplicates. Printed, written as JSON + Markdown, and drawn as length histograms (PNG)."""

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

from runner.atomic import save_figure, write_json, write_text

TOKENIZE_BATCH = 256


def _percentiles(values: List[int]) -> Dict[str, int]:
    if not values:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    ordered = sorted(values)

    def pick(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1]}


def _token_counts(conversations: List[list], tokenizer) -> List[int]:
    counts = []
    for start in range(0, len(conversations), TOKENIZE_BATCH):
        texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in conversations[start:start + TOKENIZE_BATCH]]
        counts += [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return counts


def explore_split(path, tokenizer=None, max_seq_length: Optional[int] = None, progress: bool = True) -> Dict[str, Any]:
    from tqdm import tqdm

    turns, chars, roles = [], [], Counter()
    fingerprints: Counter = Counter()
    conversations = []
    size = Path(path).stat().st_size
    # `delay`: the bar appears only for a scan that takes a while (a large download), not for the small sample
    with open(path, encoding="utf-8") as f, tqdm(total=size, unit="B", unit_scale=True, desc=f"scan {Path(path).name}",
                                                 disable=not progress, leave=False, delay=1.0) as bar:
        for line in f:
            bar.update(len(line.encode("utf-8")))
            if not line.strip():
                continue
            messages = json.loads(line)["messages"]
            turns.append(sum(1 for m in messages if m["role"] != "system"))
            chars.append(sum(len(m["content"]) for m in messages))
            roles.update(m["role"] for m in messages)
            # a 16-byte digest, not the text itself: a large split's fingerprints stay small in memory
            fingerprints[hashlib.blake2b(json.dumps(messages, sort_keys=True).encode(), digest_size=16).digest()] += 1
            if tokenizer is not None:
                conversations.append(messages)
    stats: Dict[str, Any] = {
        "rows": len(turns),
        "turns": {**_percentiles(turns), "histogram": dict(sorted(Counter(turns).items()))},
        "chars": _percentiles(chars),
        "roles": dict(roles),
        "duplicates": sum(n - 1 for n in fingerprints.values() if n > 1),
        "_chars": chars,
        "_turns": turns,
    }
    if tokenizer is not None:
        tokens = _token_counts(conversations, tokenizer)
        limit = max_seq_length if max_seq_length and max_seq_length > 0 else tokenizer.model_max_length
        stats["tokens"] = _percentiles(tokens)
        stats["max_seq_length"] = limit
        stats["truncated_rows"] = sum(1 for t in tokens if t > limit)
        stats["_tokens"] = tokens
    return stats


def _plot(per_split: Dict[str, Dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("_turns", "turns (user + assistant messages)"), ("_chars", "characters per conversation")]
    if any("_tokens" in s for s in per_split.values()):
        panels.append(("_tokens", "tokens per conversation (chat template)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (key, title) in zip(axes, panels):
        values = [v for stats in per_split.values() for v in stats.get(key) or []]
        if not values:
            continue
        low, high = min(values), max(values)
        if key == "_turns":  # one bar per integer count
            bins = [b - 0.5 for b in range(low, high + 2)]
        else:  # the same edges for every split, so their bars compare
            bins = [low + (high - low + 1) * i / 30 for i in range(31)]
        for split, stats in per_split.items():
            if stats.get(key):
                ax.hist(stats[key], bins=bins, alpha=0.5, label=split)
        if key == "_tokens":
            limit = next((s["max_seq_length"] for s in per_split.values() if "max_seq_length" in s), None)
            if limit:
                ax.axvline(limit, color="red", linestyle="--", label=f"max_seq_length {limit}")
        ax.set_title(title)
        ax.set_ylabel("rows")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def _markdown(per_split: Dict[str, Dict[str, Any]]) -> str:
    has_tokens = any("tokens" in s for s in per_split.values())
    head = ["split", "rows", "turns p50/max", "chars p50/p90/p99/max"]
    if has_tokens:
        head += ["tokens p50/p90/p99/max", "over max_seq_length"]
    head += ["roles (system/user/assistant)", "duplicates"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for split, s in per_split.items():
        c, t = s["chars"], s["turns"]
        row = [split, str(s["rows"]), f"{t['p50']}/{t['max']}", f"{c['p50']}/{c['p90']}/{c['p99']}/{c['max']}"]
        if has_tokens:
            k = s.get("tokens")
            row += [f"{k['p50']}/{k['p90']}/{k['p99']}/{k['max']}" if k else "",
                    f"{s.get('truncated_rows', '')} (> {s.get('max_seq_length', '')})" if k else ""]
        r = s["roles"]
        row += [f"{r.get('system', 0)}/{r.get('user', 0)}/{r.get('assistant', 0)}", str(s["duplicates"])]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "turns per conversation (turns: rows):"]
    for split, s in per_split.items():
        lines.append(f"  {split}: " + ", ".join(f"{t}: {n}" for t, n in s["turns"]["histogram"].items()))
    return "\n".join(lines) + "\n"


def explore(files: Dict[str, str], out_dir, *, tokenizer_dir: Optional[str] = None,
            max_seq_length: Optional[int] = None, progress: bool = True) -> Dict[str, Any]:
    """Summarise every split; write data_summary.json/.md and data_lengths.png into out_dir."""
    tokenizer = None
    if tokenizer_dir:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    per_split = {split: explore_split(path, tokenizer, max_seq_length, progress) for split, path in files.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = _plot(per_split, out_dir / "data_lengths.png")
    table = _markdown(per_split)
    public = {split: {k: v for k, v in s.items() if not k.startswith("_")} for split, s in per_split.items()}
    summary_json = out_dir / "data_summary.json"
    write_json(summary_json, public)
    summary_md = out_dir / "data_summary.md"
    write_text(summary_md, table)
    print(table, flush=True)
    return {"summary": public, "summary_json": str(summary_json), "summary_md": str(summary_md), "plot": str(plot),
            "table": table}
