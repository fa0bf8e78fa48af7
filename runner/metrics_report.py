"""Metric histories -> the printed table of final figures and the loss-curve PNG.

Backend-neutral on purpose (no MLflow, no torch, no azure): the local backend feeds it MLflow's metric history, the
Azure backend can feed it the job's metrics the same way. A history is {metric: [[step, value], ...]}.
"""

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from runner.atomic import save_figure, write_json

# The figures the report knows, in table order, with the names trainers commonly log them under.
ALIASES: Dict[str, Sequence[str]] = {
    "train_loss": ("train_loss", "loss", "train/loss"),
    "eval_loss": ("eval_loss", "eval/loss"),
    "perplexity": ("perplexity", "eval_perplexity", "eval/perplexity"),
    "tokens_per_s": ("tokens_per_s", "train_tokens_per_second", "tokens_per_second"),
    "learning_rate": ("learning_rate", "lr", "train/learning_rate"),
}
_LOWER_IS_BETTER = {"train_loss", "eval_loss", "perplexity"}


def canonical(history: Dict[str, List[Sequence[float]]]) -> Dict[str, List[List[float]]]:
    """The known figures under their canonical names, points sorted by step; unknown metrics are left out."""
    out = {}
    for name, aliases in ALIASES.items():
        for alias in aliases:
            points = history.get(alias)
            if points:
                out[name] = sorted(([int(s), float(v)] for s, v in points), key=lambda p: p[0])
                break
    return out


def _perplexity(loss: float) -> Optional[float]:
    return math.exp(loss) if loss < 700 else None  # exp overflows a float past ~709


def final_figures(history: Dict[str, List[Sequence[float]]]) -> Dict[str, float]:
    curves = canonical(history)
    final = {name: points[-1][1] for name, points in curves.items()}
    if "perplexity" not in final and "eval_loss" in final:
        ppl = _perplexity(final["eval_loss"])
        if ppl is not None:
            final["perplexity"] = ppl
    return {name: final[name] for name in ALIASES if name in final}


def _fmt(name: str, value: Optional[float]) -> str:
    if value is None:
        return ""
    if not math.isfinite(value):
        return str(value)
    if name == "learning_rate":
        return f"{value:.3g}"
    if name == "tokens_per_s":
        return f"{value:,.0f}"
    return f"{value:.4f}"


def format_table(final: Dict[str, float], history: Optional[Dict[str, List[Sequence[float]]]] = None) -> str:
    """A markdown table of the final figures; with the history also the first value (for eval loss: before
    training, when the trainer evaluates at step 0), the best one and the step of the final one."""
    if not final:
        return "| metric | final |\n|---|---|\n| (no metrics logged) | |"
    if history is None:
        rows = ["| metric | final |", "|---|---:|"]
        rows += [f"| {name} | {_fmt(name, value)} |" for name, value in final.items()]
        return "\n".join(rows)
    curves = canonical(history)
    rows = ["| metric | final | at step | first | best |", "|---|---:|---:|---:|---:|"]
    for name, value in final.items():
        points = curves.get(name)
        if not points:  # derived (perplexity from eval loss)
            rows.append(f"| {name} | {_fmt(name, value)} | | | |")
            continue
        values = [v for _, v in points]
        best = min(values) if name in _LOWER_IS_BETTER else (max(values) if name == "tokens_per_s" else None)
        rows.append(f"| {name} | {_fmt(name, value)} | {points[-1][0]} | {_fmt(name, points[0][1])} | "
                    f"{_fmt(name, best)} |")
    return "\n".join(rows)


def plot_losses(history: Dict[str, List[Sequence[float]]], path: Path, title: str) -> Path:
    """Train and eval loss against the optimizer step (either may be missing) as a PNG."""
    # The object API with an Agg canvas: no pyplot, so no process-wide backend or figure registry is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = canonical(history)
    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    styles = {"train_loss": dict(label="train loss", color="tab:blue", linewidth=1.2),
              "eval_loss": dict(label="eval loss", color="tab:orange", linewidth=1.8, marker="o", markersize=4)}
    drawn = 0
    for name, style in styles.items():
        points = curves.get(name)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], **style)
            drawn += 1
    if drawn:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no train or eval loss was logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return path


def report(history: Dict[str, List[Sequence[float]]], out_dir, *, title: str) -> Dict[str, Any]:
    """{"final": {...}, "table": markdown, "plot": loss_curve.png path, "json": metrics.json path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = final_figures(history)
    table = format_table(final, history)
    plot = plot_losses(history, out / "loss_curve.png", title)
    write_json(out / "metrics.json", {"title": title, "final": final, "history": history}, indent=1)
    return {"final": final, "table": table, "plot": str(plot), "json": str(out / "metrics.json")}
