"""export: the registered model taken out as people run it elsewhere: merged safetensors, GGUF made by llama.cpp's
own converter, an Ollama Modelfile (runner/export/pipeline.py does the work, the same on every backend).

Which model: `export.model` (models:/NAME/VERSION, or a model folder), else the version the register step recorded
(this run's or from_run's), whose identity is checked against the registry before it is used (another run's model
under the same version number, or changed files, are refused). A run that registered nothing is refused before
anything is written, as are unknown formats (the config check), an architecture the converter does not cover and a
disk without room (the pipeline). The backend hands over the model's files as a local folder (local: the MLflow
version's folder; azureml: `ml_client.models.download`) and logs the outputs as artifacts of the version's run.
Outputs go to `<run dir>/export/` (or export.output_dir); their paths, sizes and sha256 go into the run record.
"""

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Protocol

from omegaconf import OmegaConf

from runner.errors import MissingInput
from runner.step_results import DataResult, StepResult


@dataclass
class ExportResult(StepResult):
    STEP: ClassVar[str] = "export"
    model_uri: Optional[str] = None
    out_dir: Optional[str] = None
    outputs: Optional[Dict[str, Any]] = None  # format -> {"path", "bytes", "sha256"} (merged: per file too)
    ollama_command: Optional[str] = None
    logged_to: Optional[str] = None  # the run whose artifacts hold the outputs


class ExportActions(Protocol):
    """What the export step asks of a backend."""

    def export_source(self, ctx, model_uri: str, registered: Optional[Dict[str, Any]], work_dir: Path
                      ) -> Dict[str, Any]:
        """The model's files as a local folder: {"folder", "run_id", "base_dir", "name"} ("planned": what would
        be fetched, on a dry run). `registered`: the record's register outputs, checked against the registry."""
        ...

    def log_export(self, ctx, source: Dict[str, Any], out_dir: Path) -> Dict[str, Any]:
        """The outputs logged as artifacts of the registered version's run: {"logged_to", "artifact_path"}."""
        ...


def chosen_model(ctx) -> tuple:
    """(model_uri, registered record or None): export.model, else the register step's version; refuses neither."""
    wanted = ctx.cfg.export.model
    registered = ctx.record.output("register") or None
    if wanted:
        same = registered and registered.get("model_uri") == wanted
        return str(wanted), (registered if same else None)
    if not registered or not registered.get("model_uri"):
        raise MissingInput("nothing to export: no registered model in this run (or from_run=). Run the register "
                           "step first (steps=[...,register,export]), point from_run= at a run that registered "
                           "one, or name a version with export.model=models:/NAME/VERSION")
    return registered["model_uri"], registered


def held_out_chats(ctx, n: int) -> List[List[Dict[str, str]]]:
    """Up to n chats of the data step's test split that end in an assistant turn (llama.cpp re-checks them)."""
    path = DataResult.recorded(ctx.record).test_file
    if not n or not path or not Path(path).is_file():
        return []
    chats = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            messages = json.loads(line).get("messages") or []
            if messages and messages[-1].get("role") == "assistant":
                chats.append([{"role": m["role"], "content": m["content"]} for m in messages])
            if len(chats) >= n:
                break
    return chats


def _plan(ctx, model_uri: str, source: Dict[str, Any], out_dir: Path) -> ExportResult:
    from runner.atomic import write_text

    cfg = ctx.cfg.export
    plan = {"model": model_uri, "download": source.get("planned"), "formats": list(cfg.formats),
            "out_dir": str(out_dir), "converter": cfg.converter or "llama-cpp-python sdist (runner/export/"
                                                                      "converter_pin.json), fetched with pip",
            "log_artifacts_to": source.get("run_id")}
    path = write_text(ctx.plan_dir / "export.yaml", OmegaConf.to_yaml(OmegaConf.create(plan)))
    ctx.say(f"export: planned in {path}")
    return ExportResult(model_uri=model_uri, out_dir=str(out_dir), details={"planned": plan, "plan_file": str(path)})


def run(ctx, backend: ExportActions) -> ExportResult:
    from runner.export.pipeline import check_formats, export_model

    import logging

    logging.getLogger("gguf").setLevel(logging.WARNING)  # gguf-py's per-file INFO lines: the step says what matters
    cfg = ctx.cfg.export
    formats = check_formats(list(cfg.formats))
    model_uri, registered = chosen_model(ctx)
    out_dir = Path(cfg.output_dir or ctx.run_dir / "export")
    work = Path(tempfile.mkdtemp(prefix=".export-source-", dir=ctx.run_dir))
    try:
        source = backend.export_source(ctx, model_uri, registered, work)
        if source.get("planned"):
            return _plan(ctx, model_uri, source, out_dir)
        name = cfg.name or source.get("name") or ctx.cfg.mlflow.registered_model_name
        record = export_model(source["folder"], out_dir, formats, name=str(name), converter=cfg.converter,
                              cache_dir=cfg.cache_dir, base_dir=source.get("base_dir"),
                              check_chats=held_out_chats(ctx, int(cfg.check_chats)) or None, say=ctx.say)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logged = backend.log_export(ctx, source, out_dir)
    outputs = {fmt: {k: info[k] for k in ("path", "bytes", "sha256", "files") if k in info}
               for fmt, info in record["outputs"].items()}
    details = {"export_record": str(out_dir / "export.json"), "registered_run_id": source.get("run_id"),
               "checks": record.get("checks"), **{k: v for k, v in logged.items() if k != "logged_to"}}
    return ExportResult(model_uri=model_uri, out_dir=str(out_dir), outputs=outputs,
                        ollama_command=(record.get("ollama") or {}).get("command"),
                        logged_to=logged.get("logged_to"), details=details)
