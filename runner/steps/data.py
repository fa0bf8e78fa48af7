"""data: the same on every backend. The splits are fetched (or, in a dry run, only named), converted to messages
rows, validated and explored; then the backend adds its part (Azure: the files the pipeline job uploads)."""

from pathlib import Path
from typing import Any, Dict, Optional, Protocol

from runner.step_results import DataResult, ModelResult


class DataActions(Protocol):
    """What the data step asks of a backend."""

    def tokenizer_dir(self, ctx) -> Optional[str]: ...

    def data(self, ctx, data: Dict[str, Any]) -> Dict[str, Any]: ...


def run(ctx, backend: DataActions) -> DataResult:
    from runner.data.step import run_data_step

    cfg = ctx.cfg
    tokenizer_dir = ModelResult.recorded(ctx.record).tokenizer_dir or backend.tokenizer_dir(ctx)
    outputs = run_data_step(
        cfg.dataset,
        run_dir=ctx.run_dir,
        max_seq_length=cfg.finetune.max_seq_length,
        tokenizer_dir=tokenizer_dir,
        dry_run=bool(cfg.dry_run),  # a plan names the files; nothing is downloaded
    )
    # Recorded absolute: a later run (from_run=) started from another directory must find the same files.
    for key in ("train_file", "test_file", "sample_file", "download_dir"):
        if outputs.get(key):
            outputs[key] = str(Path(outputs[key]).resolve())
    outputs["files"] = {k: str(Path(v).resolve()) for k, v in (outputs.get("files") or {}).items()}
    outputs.update(backend.data(ctx, outputs) or {})
    return DataResult.from_outputs(outputs)
