"""The evaluation's outputs, all written atomically into one folder (`<run dir>/evaluate/`):

    metrics.json     every metric: base, fine-tuned, difference, 95% interval, verdict; plus how the run went
    rows.jsonl       per row: prompt, reference, both replies, both models' per-row scores, improved/regressed
    report.md        the verdict table and the rows that changed most, side by side
    comparison.png   base vs fine-tuned per metric, with the interval of the change

and the console summary, one line per metric:  `ROUGE-L 0.08 -> 0.61 (+0.53, 95% CI +0.47..+0.58) better`.
"""

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from runner.atomic import atomic_writer, save_figure, write_json, write_text
from runner.evaluation.results import Evaluation
from runner.evaluation.stats import BETTER, WORSE, Comparison

MOST_CHANGED = 5  # rows shown per side (improved / regressed) in report.md
_CELL = 300  # characters of a prompt or reply shown in a report.md cell


# ---- numbers as people read them ---------------------------------------------------------------------------------

def _num(value: float, digits: int, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return ("+" if sign and value > 0 else "") + ("inf" if value > 0 else "-inf")
    text = f"{value:{'+' if sign else ''}.{digits}f}"
    return "+0" + text[2:] if sign and text.startswith("-0") and float(text) == 0 else text


def summary_line(c: Comparison, digits: int, label_width: int = 0) -> str:
    """`ROUGE-L 0.08 -> 0.61 (+0.53, 95% CI +0.47..+0.58) better`"""
    return (f"{c.label:<{label_width}} {_num(c.base, digits)} -> {_num(c.ft, digits)} "
            f"({_num(c.delta, digits, True)}, 95% CI {_num(c.ci_low, digits, True)}..{_num(c.ci_high, digits, True)})"
            f" {c.verdict}")


def summary_lines(evaluation: Evaluation) -> List[str]:
    width = max(len(c.label) for c in evaluation.comparisons)
    digits = {m.name: m.digits for m in evaluation.metrics}
    return [summary_line(c, digits[c.metric], width) for c in evaluation.comparisons]


def console_summary(evaluation: Evaluation) -> str:
    counts = evaluation.counts()
    head = (f"fine-tuned vs base on {len(evaluation.rows)} held-out rows (paired bootstrap, seed {evaluation.seed}); "
            f"by {evaluation.primary}: {counts['improved']} improved, {counts['regressed']} regressed, "
            f"{counts['unchanged']} unchanged")
    return "\n".join([head] + ["  " + line for line in summary_lines(evaluation)])


# ---- metrics.json ------------------------------------------------------------------------------------------------

def mlflow_metrics(evaluation: Evaluation) -> Dict[str, float]:
    """`eval_base_<m>`, `eval_ft_<m>`, `eval_delta_<m>` (+ the interval ends) for every metric; finite values only
    (MLflow refuses NaN in some stores)."""
    out = {}
    for c in evaluation.comparisons:
        for key, value in (("base", c.base), ("ft", c.ft), ("delta", c.delta), ("delta_ci_low", c.ci_low),
                           ("delta_ci_high", c.ci_high)):
            if value is not None and math.isfinite(value):
                out[f"eval_{key}_{c.metric}"] = float(value)
    return out


def metrics_document(evaluation: Evaluation) -> Dict[str, Any]:
    return {
        "rows": len(evaluation.rows),
        "seed": evaluation.seed,
        "confidence": 0.95,
        "resamples": evaluation.comparisons[0].resamples if evaluation.comparisons else 0,
        "primary_metric": evaluation.primary,
        "rows_changed": evaluation.counts(),
        "metrics": {c.metric: c.to_dict() for c in evaluation.comparisons},
        "verdicts": {c.metric: c.verdict for c in evaluation.comparisons},
        "summary": summary_lines(evaluation),
        "mlflow": mlflow_metrics(evaluation),
        "info": evaluation.info,
    }


# ---- rows.jsonl ------------------------------------------------------------------------------------------------

def _finite(value) -> Optional[float]:
    value = float(value)
    return value if math.isfinite(value) else None


def row_records(evaluation: Evaluation) -> List[Dict[str, Any]]:
    records = []
    for i, row in enumerate(evaluation.rows):
        base, ft = evaluation.base[i], evaluation.ft[i]
        records.append({
            "index": row.index,
            "prompt": row.prompt,
            "reference": row.reference,
            "base_reply": base.reply,
            "ft_reply": ft.reply,
            "base_scores": {m: _finite(v[i]) for m, v in evaluation.row_scores["base"].items()},
            "ft_scores": {m: _finite(v[i]) for m, v in evaluation.row_scores["ft"].items()},
            "change": evaluation.changes[i],
            "by": evaluation.primary,
        })
    return records


def rows_table(evaluation: Evaluation) -> Dict[str, list]:
    """The rows as MLflow's log_table takes them (column -> values): the last user turn, the reference, both
    replies, both models' scores on the primary metric and the row's change."""
    records = row_records(evaluation)
    primary = evaluation.primary

    def text(value):
        return "" if value is None else value

    return {
        "index": [r["index"] for r in records],
        "prompt": [text(_last_user_turn(r["prompt"])) for r in records],
        "reference": [text(r["reference"]) for r in records],
        "base_reply": [text(r["base_reply"]) for r in records],
        "ft_reply": [text(r["ft_reply"]) for r in records],
        f"base_{primary}": [r["base_scores"].get(primary) for r in records],
        f"ft_{primary}": [r["ft_scores"].get(primary) for r in records],
        "change": [r["change"] for r in records],
    }


def write_rows(path, evaluation: Evaluation) -> Path:
    with atomic_writer(path) as f:
        for record in row_records(evaluation):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return Path(path)


# ---- report.md -------------------------------------------------------------------------------------------------

def _cell(text: Optional[str], limit: int = _CELL) -> str:
    if text is None:
        return "—"
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "(empty)"


def _last_user_turn(prompt: List[Dict[str, str]]) -> str:
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else (prompt[-1]["content"] if prompt else "")


def _most_changed(evaluation: Evaluation, change: str) -> List[int]:
    base, ft = evaluation.row_scores["base"][evaluation.primary], evaluation.row_scores["ft"][evaluation.primary]
    picked = [i for i, c in enumerate(evaluation.changes) if c == change]
    return sorted(picked, key=lambda i: -abs(float(ft[i]) - float(base[i])))[:MOST_CHANGED]


def report_markdown(evaluation: Evaluation) -> str:
    digits = {m.name: m.digits for m in evaluation.metrics}
    counts = evaluation.counts()
    lines = [
        "# Fine-tuned vs base",
        "",
        f"{len(evaluation.rows)} held-out rows, both models on the same rows; the interval is a paired bootstrap "
        f"95% interval of fine-tuned minus base over rows (seed {evaluation.seed}).",
        "",
        "| Metric | Base | Fine-tuned | Change | 95% interval | Verdict |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for c in evaluation.comparisons:
        d = digits[c.metric]
        word = f"**{c.verdict}**" if c.verdict in (BETTER, WORSE) else c.verdict
        lines.append(f"| {c.label} | {_num(c.base, d)} | {_num(c.ft, d)} | {_num(c.delta, d, True)} | "
                     f"{_num(c.ci_low, d, True)} .. {_num(c.ci_high, d, True)} | {word} |")
    lines += ["", f"By {evaluation.primary}, per row: {counts['improved']} improved, {counts['regressed']} regressed, "
                  f"{counts['unchanged']} unchanged."]
    base_scores = evaluation.row_scores["base"][evaluation.primary]
    ft_scores = evaluation.row_scores["ft"][evaluation.primary]
    d = digits[evaluation.primary]
    for change, title in (("improved", "Rows that improved most"), ("regressed", "Rows that regressed most")):
        picked = _most_changed(evaluation, change)
        lines += ["", f"## {title}", ""]
        if not picked:
            lines.append("None.")
            continue
        lines += [f"| Row | Prompt (last user turn) | Reference | Base reply | Fine-tuned reply | {evaluation.primary} |",
                  "|---:|---|---|---|---|---:|"]
        for i in picked:
            row = evaluation.rows[i]
            lines.append(f"| {row.index} | {_cell(_last_user_turn(row.prompt))} | {_cell(row.reference)} | "
                         f"{_cell(evaluation.base[i].reply)} | {_cell(evaluation.ft[i].reply)} | "
                         f"{_num(float(base_scores[i]), d)} -> {_num(float(ft_scores[i]), d)} |")
    return "\n".join(lines) + "\n"


# ---- comparison.png --------------------------------------------------------------------------------------------

_COLOURS = {BETTER: "#2a9d3a", WORSE: "#c0392b"}


def comparison_figure(evaluation: Evaluation):
    """One panel per metric (their scales differ): base and fine-tuned bars, each with its own 95% interval; the
    title gives the change with its paired 95% interval, which decides the verdict (paired intervals are narrower:
    both models are resampled on the same rows)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    comparisons = evaluation.comparisons
    digits = {m.name: m.digits for m in evaluation.metrics}
    cols = min(len(comparisons), 4)
    rows = math.ceil(len(comparisons) / cols)
    fig = Figure(figsize=(3.3 * cols, 3.0 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, c in zip(axes, comparisons):
        values, errors = [], [[], []]
        for value, (low, high) in ((c.base, c.base_ci), (c.ft, c.ft_ci)):
            shown = value if math.isfinite(value) else 0.0
            values.append(shown)
            ok = all(math.isfinite(x) for x in (value, low, high))
            errors[0].append(max(shown - low, 0) if ok else 0)
            errors[1].append(max(high - shown, 0) if ok else 0)
        ax.bar([0, 1], values, color=["#9aa5b1", "#3a6ea5"], width=0.6, yerr=errors, capsize=5,
               error_kw={"ecolor": "black", "elinewidth": 1})
        ax.set_xticks([0, 1], ["base", "fine-tuned"])
        d = digits.get(c.metric, 3)
        ax.set_title(f"{c.label}: {_num(c.delta, d, True)} [{_num(c.ci_low, d, True)}, {_num(c.ci_high, d, True)}]"
                     f"\n{c.verdict}", fontsize=9, color=_COLOURS.get(c.verdict, "#444444"))
        ax.tick_params(labelsize=8)
    for ax in axes[len(comparisons):]:
        ax.set_visible(False)
    fig.suptitle(f"Fine-tuned vs base on {len(evaluation.rows)} held-out rows: bars with each score's 95% interval; "
                 f"titles: the change with its paired 95% interval", fontsize=10)
    return fig


# ---- all of it -------------------------------------------------------------------------------------------------

def write_outputs(evaluation: Evaluation, out_dir) -> Dict[str, str]:
    """Write the four files into out_dir; returns their paths."""
    out = Path(out_dir)
    paths = {"metrics_json": out / "metrics.json", "rows_jsonl": out / "rows.jsonl", "report_md": out / "report.md",
             "comparison_png": out / "comparison.png"}
    write_rows(paths["rows_jsonl"], evaluation)
    write_text(paths["report_md"], report_markdown(evaluation))
    save_figure(comparison_figure(evaluation), paths["comparison_png"], dpi=100)
    write_json(paths["metrics_json"], metrics_document(evaluation))  # last: its presence marks a finished evaluation
    return {k: str(v) for k, v in paths.items()}
