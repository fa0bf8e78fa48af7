"""The evaluator as a program: `python -m runner.local.evaluate_program --base DIR (--ft DIR | --adapter DIR) --rows FILE
--out DIR [options]`. It is what the Azure ML evaluate job runs on the cluster (runner/azureml/evaluate_job.py),
and works the same on any machine.

Model folders may be save_pretrained folders or MLflow model folders as Azure ML mounts them: the registry's
`hftransformersv2` layout (weights data/model, tokenizer data/tokenizer) or the open-source `transformers` flavour
(model/, components/tokenizer). Writes metrics.json, rows.jsonl, report.md and comparison.png into --out, prints
the verdict table, and logs the metrics (`eval_base_*`, `eval_ft_*`, `eval_delta_*`), the rows as a table and the
files to MLflow when a tracking server is configured (MLFLOW_TRACKING_URI, which Azure ML sets in its jobs) or
--mlflow is given.

Runs on the curated Azure environment's older pins too (Python 3.10, transformers 5.3, sacrebleu 2.4): it imports
nothing of the runner's config layer (no Hydra/OmegaConf), only runner.evaluation and runner.local.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

from runner.errors import RunnerError

_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


def _layout(folder: Path) -> Tuple[Path, Optional[Path]]:
    """(weights folder, tokenizer folder if elsewhere) of a save_pretrained or MLflow model folder."""
    if (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
        return folder, None
    for weights, tokenizer in (("data/model", "data/tokenizer"), ("model", "components/tokenizer")):
        if (folder / weights / "config.json").is_file():
            tok = folder / tokenizer
            return folder / weights, (tok if tok.is_dir() else None)
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "not a folder"
    raise RunnerError(f"{folder}: no model found (expected config.json, data/model/config.json for an Azure "
                      f"registry MLflow model, or model/config.json for an MLflow transformers model; found {found})")


def model_folder(path, scratch: Path) -> Path:
    """A folder transformers loads with one from_pretrained: `path` itself, or (when the tokenizer lives apart, as
    in MLflow folders) a scratch folder of links to the weights' and the tokenizer's files."""
    weights, tokenizer = _layout(Path(path))
    if tokenizer is None or any((weights / name).is_file() for name in _TOKENIZER_FILES):
        return weights
    joined = Path(tempfile.mkdtemp(prefix="model-", dir=scratch))
    for source in (weights, tokenizer):
        for item in source.iterdir():
            if not (joined / item.name).exists():
                (joined / item.name).symlink_to(item.resolve())
    return joined


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    from runner.evaluation.names import METRIC_NAMES

    p = argparse.ArgumentParser(prog="python -m runner.local.evaluate_program",
                                description="Score a fine-tuned model against its base on held-out chats.")
    p.add_argument("--base", required=True, help="the base model folder")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--ft", help="the fine-tuned (merged or fully trained) model folder")
    which.add_argument("--adapter", help="a LoRA adapter folder (scored against --base with the adapter off)")
    p.add_argument("--rows", required=True, help="a messages JSONL file (the held-out split or a golden set)")
    p.add_argument("--out", required=True, help="the folder for metrics.json, rows.jsonl, report.md, comparison.png")
    p.add_argument("--max-rows", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--time-budget-s", type=float, default=0.0)
    p.add_argument("--metrics", default=",".join(METRIC_NAMES), help="comma-separated metric names")
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--mlflow", action="store_true", help="log to MLflow even without MLFLOW_TRACKING_URI")
    return p.parse_args(argv)


def log_to_mlflow(evaluation, paths) -> None:
    """Metrics, the rows as a table and the files, into the active run (Azure ML's job run) or a new one."""
    import mlflow

    from runner.evaluation.report import mlflow_metrics, rows_table

    owns_run = mlflow.active_run() is None
    if owns_run:
        mlflow.start_run()
    try:
        mlflow.log_metrics({**mlflow_metrics(evaluation), "eval_rows": len(evaluation.rows)})
        mlflow.set_tags({f"eval_verdict_{c.metric}": c.verdict for c in evaluation.comparisons})
        mlflow.log_table(rows_table(evaluation), artifact_file="evaluate/rows.json")
        for path in paths.values():
            mlflow.log_artifact(path, artifact_path="evaluate")
    finally:
        if owns_run:
            mlflow.end_run()


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from runner.evaluation.report import console_summary, write_outputs
    from runner.local.evaluator import EvaluatorSettings, evaluate

    settings = EvaluatorSettings(
        max_rows=args.max_rows, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
        time_budget_s=args.time_budget_s, metrics=[m.strip() for m in args.metrics.split(",") if m.strip()],
        do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p, resamples=args.resamples,
        device=args.device)
    try:
        with tempfile.TemporaryDirectory(prefix="ftrun-eval-") as scratch:
            scratch = Path(scratch)
            base = model_folder(args.base, scratch)
            ft = model_folder(args.ft, scratch) if args.ft else None
            adapter = model_folder(args.adapter, scratch) if args.adapter else None
            evaluation = evaluate(base_dir=base, ft_dir=ft, adapter_dir=adapter, rows_file=args.rows,
                                  settings=settings, progress=lambda text: print(text, flush=True))
        paths = write_outputs(evaluation, args.out)
    except RunnerError as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    print(console_summary(evaluation), flush=True)
    if args.mlflow or os.environ.get("MLFLOW_TRACKING_URI"):
        log_to_mlflow(evaluation, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
