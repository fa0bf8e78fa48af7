"""The local backend: every step of the workflow carried out on this machine.

Training is transformers + PEFT (runner/local/train.py), tracking and the model registry are MLflow on SQLite
(runner/local/tracking.py, registry.py), and the online endpoint is a FastAPI process (runner/local/endpoint/).
This module only wires the config and the run record to those pieces.
"""

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import OmegaConf

from runner.backend_api import Backend
from runner.errors import MissingInput
from runner.figures import figure
from runner.finetune_params import dataset_label, pipeline_display_name
from runner.step_results import ComputeResult, DataResult, DeployResult, FinetuneResult, ModelResult, RegisterResult


def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


class LocalBackend(Backend):
    name = "local"

    def __init__(self, cfg):
        from runner.local.tracking import artifact_roots

        self.cfg = cfg
        artifact_roots[cfg.mlflow.tracking_uri] = str(cfg.mlflow.artifact_location)

    # ---- helpers ------------------------------------------------------------------------------------------------
    @property
    def tracking_uri(self) -> str:
        return self.cfg.mlflow.tracking_uri

    def display_name(self, params) -> str:
        return pipeline_display_name(self.cfg.model.name, params, self.cfg.compute.gpus_per_node or 1,
                                     dataset_label(self.cfg.dataset.name))

    def _model_dir(self, ctx) -> str:
        model_dir = ModelResult.recorded(ctx.record).model_dir
        if not model_dir:
            model_dir = self.model(ctx)["model_dir"]
        return model_dir

    def training_key(self, ctx, params: Dict[str, Any]) -> str:
        """Identity of a training run: same model, data and settings → same checkpoint folder, so a killed run
        restarted with finetune.resume_from_checkpoint=true finds its checkpoints whatever its run dir."""
        identity = {
            "model": ModelResult.recorded(ctx.record).model_dir,
            "data": DataResult.recorded(ctx.record).manifest_sha256,
            "params": {k: v for k, v in params.items() if k != "resume_from_checkpoint"},
            "local": _plain(self.cfg.finetune.local),
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def tokenizer_dir(self, ctx):
        """`steps=[data]` alone still counts tokens when the base model is already on this machine."""
        from runner.local.models import existing_model_dir

        return existing_model_dir(self.cfg.model, models_dir=self.cfg.paths.models_dir)

    # ---- steps ----------------------------------------------------------------------------------------------
    def connect(self, ctx) -> Dict[str, Any]:
        from runner.local.store import open_store

        for key in ("root", "data_dir", "models_dir", "endpoints_dir"):
            Path(self.cfg.paths[key]).mkdir(parents=True, exist_ok=True)
        ctx.say(f"state folder {Path(self.cfg.paths.root).resolve()}")
        # the store is opened and checked first: a broken one is refused here, before anything is spent
        for line in open_store(self.tracking_uri, self.cfg.mlflow.artifact_location,
                               repair=bool(self.cfg.mlflow.get("repair_store", False))):
            ctx.say(line)
        ctx.say(f"MLflow tracking + registry at {self.tracking_uri}")
        return {"state_dir": str(Path(self.cfg.paths.root).resolve()), "tracking_uri": self.tracking_uri}

    def model(self, ctx) -> Dict[str, Any]:
        from runner.local.models import resolve_base_model

        out = resolve_base_model(self.cfg.model, models_dir=self.cfg.paths.models_dir)
        ctx.say(f"base model {out['source']}: {out['model_dir']}")
        return out

    def compute(self, ctx) -> Dict[str, Any]:
        """Device, refusals, and the memory verdict before anything is loaded: the peak estimate of the configured
        micro-batch, gradient checkpointing by finetune.local.gradient_checkpointing (auto: on only when needed),
        and a micro-batch that does not fit refused on a GPU naming the largest that fits with and without
        checkpointing (finetune.local.auto_fit=true runs that one instead). The finetune step runs the outputs'
        per_device_train_batch_size, gradient_accumulation_steps and gradient_checkpointing."""
        from runner.local.compute import check_local_compute

        params = self.finetune_params(ctx).params()
        local = self.cfg.finetune.local
        out = check_local_compute(
            device=self.cfg.compute.device,
            gpus_requested=self.cfg.compute.gpus_per_node,
            params=params,
            model_dir=self._model_dir(ctx),
            memory_headroom=self.cfg.compute.memory_headroom,
            lora_target_modules=list(local.lora_target_modules),
            lora_modules_to_save=list(local.lora_modules_to_save),
            gradient_checkpointing=local.get("gradient_checkpointing", "auto"),
            auto_fit=bool(local.get("auto_fit", False)),
            max_tokens_per_batch=int(local.max_tokens_per_batch or 0) if local.packing else 0,
            gpu_memory_gb=float(self.cfg.compute.get("gpu_memory_gb", 0) or 0),
            packing=bool(local.packing),
            chunked_loss=bool(local.get("chunked_loss", False)),
        )
        # The trainer's own refusals (speed levers this device cannot run, settings it has no meaning for), with
        # what this step decided, here rather than at the finetune step: before the data step fetches anything.
        from runner.local.translate import translate

        decided = {key: out[key] for key in ("per_device_train_batch_size", "gradient_accumulation_steps")}
        translate({**params, **decided},
                  {**_plain(local), "gradient_checkpointing": bool(out["gradient_checkpointing"])}).check(out["device"])
        est = out["estimate_gb"]
        where = (f"{out['memory_budget_gb']:.1f} GB usable of {out['memory_available_gb']:.1f} GB "
                 + (f"(what-if compute.gpu_memory_gb={out['memory_what_if_gpu_gb']})" if out["memory_what_if_gpu_gb"]
                    else "available"))
        ctx.say(
            f"device {out['device']} ({out['cuda_devices']} CUDA device(s)); {out['mode']} fine-tuning peak "
            f"~{est['total']:.2f} GB estimated (weights {est['weights']:.2f} + gradients {est['gradients']:.2f} + "
            f"optimizer {est['optimizer']:.2f} + activations {est['activations']:.2f} for "
            f"{out['tokens_per_micro_batch']} tokens per micro-batch, gradient checkpointing "
            f"{'on' if out['gradient_checkpointing'] else 'off'}) of {where}"
        )
        if out["auto_fit_applied"]:
            ctx.say(
                f"auto_fit: {out['memory_message']} -> running per_device_train_batch_size="
                f"{out['per_device_train_batch_size']} x gradient_accumulation_steps="
                f"{out['gradient_accumulation_steps']} (was {params.get('per_device_train_batch_size')} x "
                f"{params.get('gradient_accumulation_steps')}), gradient checkpointing "
                f"{'on' if out['gradient_checkpointing'] else 'off'}"
            )
        elif out["gradient_checkpointing"] and str(local.get("gradient_checkpointing", "auto")).lower() == "auto":
            ctx.say(f"gradient checkpointing on (finetune.local.gradient_checkpointing=auto): {out['memory_message']}")
        for warning in out["warnings"]:
            ctx.say(f"warning: {warning}")
        return out

    def finetune(self, ctx) -> Dict[str, Any]:
        from runner.local import distributed, tracking
        from runner.local.compute import cuda_device_count
        from runner.local.train import resolve_device, train

        cfg = self.cfg
        data = DataResult.recorded(ctx.record)  # the step (runner/steps/finetune.py) made sure the files are there
        model_dir = self._model_dir(ctx)
        params, local, notes, plan = self._trainer_settings(ctx)
        computed = ComputeResult.recorded(ctx.record)
        device = resolve_device(computed.device or "cpu")
        plan.check(device)  # before a tracking run is opened or a worker launched
        # One process on one device, or torchrun workers (several GPUs, DeepSpeed) that each run the same train()
        nproc = distributed.processes_needed(params, local, device, cuda_device_count() if device == "cuda" else 0)
        display_name = ctx.display_name(self.display_name(params))
        key = self.training_key(ctx, params)
        out_dir = self._training_folder(ctx, key, params)
        run_id = self._start_tracking_run(ctx, params, display_name=display_name, key=key, out_dir=out_dir,
                                          model_dir=model_dir, data=data)
        ctx.say(f"MLflow run {run_id} ({display_name})")
        tracking.log_artifact(self.tracking_uri, run_id, str(ctx.run_dir / "resolved_config.yaml"))
        status = "FAILED"
        train_kwargs = dict(
            model_dir=str(model_dir),
            train_file=str(data.train_file),
            eval_file=str(data.test_file) if data.test_file else None,
            params=params,
            local=local,
            out_dir=str(out_dir),
            device=device,
            trust_remote_code=cfg.model.trust_remote_code,
            cache_dir=str(Path(cfg.paths.root) / "cache" / "tokenized"),
            progress=True,
        )
        log_fn = tracking.metric_logger(self.tracking_uri, run_id)
        try:
            if nproc:
                ctx.say(f"training in {nproc} torchrun worker(s)")
                result = distributed.launch(nproc, out_dir, train_kwargs, log_fn=log_fn)
            else:
                result = train(**train_kwargs, plan=plan, log_fn=log_fn)
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            tracking.end_run(self.tracking_uri, run_id, status=status)
        result.update(mlflow_run_id=run_id, display_name=display_name, training_key=key, param_notes=notes,
                      training_dir=str(out_dir))
        if result.get("peak_gpu_memory_gb") is not None:
            estimate = computed.estimate_gb.get("total")
            ctx.say(f"peak GPU memory {result['peak_gpu_memory_gb']:.2f} GB"
                    + (f" (the compute step estimated {estimate:.2f} GB)" if estimate is not None else ""))
        ctx.say(
            f"eval loss {figure(result.get('eval_loss_before'))} -> {figure(result.get('eval_loss'))} "
            f"in {result.get('global_step')} steps, {result.get('tokens_per_s', 0):,.0f} tokens/s"
        )
        return result

    def _trainer_settings(self, ctx) -> tuple:
        """(params, finetune.local, notes, the trainer's plan): the effective parameters with what the compute step
        decided (auto_fit's micro-batch and accumulation, gradient checkpointing with "auto" resolved; absent from
        an older run record: the config's values stand), translated for this machine; each note said once."""
        from runner.local.translate import translate

        effective = self.finetune_params(ctx)  # decided once per run; copied here, since the compute step adjusts
        params, notes = effective.params(), effective.note_list()
        local = _plain(self.cfg.finetune.local)
        computed = ComputeResult.recorded(ctx.record)
        for key in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            decided = computed.decided(key)
            if decided is not None and decided != params[key]:
                notes.append(f"{key}: {params[key]!r} -> {decided!r} (compute step, finetune.local.auto_fit)")
                params[key] = decided
        if computed.decided("gradient_checkpointing") is not None:
            local["gradient_checkpointing"] = bool(computed.decided("gradient_checkpointing"))
        plan = translate(params, local)  # refuses a missing or unknown key; notes the keys that mean nothing here
        notes = notes + plan.notes
        for note in notes:
            ctx.say(note)
        return params, local, notes, plan

    def _training_folder(self, ctx, key: str, params: Dict[str, Any]):
        """A folder of its own, locked while this run lives (runner/local/training_dir.py says why and how resume
        finds an earlier one)."""
        from runner.local import training_dir

        claimed = training_dir.claim(Path(self.cfg.paths.root) / "training" / key, resume=bool(params.get(
            "resume_from_checkpoint")))
        if claimed["resumed_folder"]:
            ctx.say(f"resuming in {claimed['out_dir']}")
        return claimed["out_dir"]

    def _start_tracking_run(self, ctx, params, *, display_name: str, key: str, out_dir, model_dir, data) -> str:
        """The MLflow run of this fine-tune, tagged with its lineage, params as the trainer gets them."""
        from runner.local import tracking

        cfg = self.cfg
        tags = {
            "display_name": display_name,
            "backend": "local",
            "base_model": cfg.model.name,
            "base_model_dir": model_dir,
            "data_manifest_sha256": data.manifest_sha256 or "",
            "config_sha256": ctx.record.data["config_sha256"],
            "training_key": key,
            "training_dir": str(Path(out_dir).resolve()),
            "run_dir": str(ctx.run_dir.resolve()),
            "overrides": " ".join(ctx.task_overrides),
            **ctx.tracking_tags(),
        }
        run_id = tracking.start_run(
            tracking_uri=self.tracking_uri,
            experiment_name=cfg.mlflow.experiment_name,
            artifact_location=str(Path(cfg.mlflow.artifact_location).resolve()),
            run_name=display_name,
            params={**params, **{f"local.{k}": v for k, v in _plain(cfg.finetune.local).items()}},
            tags=tags,
        )
        return run_id

    def metrics(self, ctx) -> Dict[str, Any]:
        from runner.local import tracking
        from runner.metrics_report import report

        finetuned = FinetuneResult.require(ctx.record, "no MLflow run to report", needs="mlflow_run_id")
        run_id = finetuned.mlflow_run_id
        history = tracking.metric_history(self.tracking_uri, run_id)
        out = report(history, ctx.run_dir / "metrics", title=finetuned.display_name or run_id)
        tracking.log_artifact(self.tracking_uri, run_id, out["plot"])
        print(out["table"], flush=True)
        ctx.say(f"loss curve: {out['plot']}")
        ctx.say(f"browse: mlflow ui --backend-store-uri {self.tracking_uri}")
        return {"final": out["final"], "plot": out["plot"], "json": out["json"], "mlflow_run_id": run_id}

    def evaluate(self, ctx, job) -> Dict[str, Any]:
        from runner.local.evaluation_run import evaluate_here

        return evaluate_here(ctx, job, self.tracking_uri)

    def register(self, ctx) -> Dict[str, Any]:
        from runner.local.registry import register_model

        ft = FinetuneResult.require(ctx.record, "nothing to register", needs="final_model_dir")
        tags = {
            "base_model": self.cfg.model.name,
            "base_model_dir": ModelResult.recorded(ctx.record).model_dir or "",
            "data_manifest_sha256": DataResult.recorded(ctx.record).manifest_sha256 or "",
            "mlflow_run_id": ft.mlflow_run_id,
            "config_sha256": ctx.record.data["config_sha256"],
            "display_name": ft.display_name or "",
            "training_key": ft.training_key or "",
            "quality_gate": ctx.quality_gate or "",  # the register step's verdict (runner/steps/register.py)
            **ctx.version_tags,  # the evaluate step's verdicts (runner/steps/evaluate.py verdict_tags)
        }
        out = register_model(
            tracking_uri=self.tracking_uri,
            run_id=ft.mlflow_run_id,
            model_dir=ft.final_model_dir,
            registered_name=self.cfg.mlflow.registered_model_name,
            tags=tags,
            description=f"{self.cfg.model.name} fine tuned model for ultrachat 200k chat-completion",
        )
        from runner.local.model_identity import identity

        out.update(identity(self.tracking_uri, out["model_uri"]))  # what deploy/test check the version against
        ctx.say(f"registered {out['model_uri']}" + (" (already registered for this run)" if out.get("reused") else ""))
        return out

    def _endpoint_name(self, ctx) -> str:
        from runner.local.endpoint.manager import unique_name

        # a random suffix: two runs deploying in the same second must not share a name, key and state files
        return self.cfg.endpoint_name or unique_name(self.cfg.deployment.endpoint_name_prefix)

    def deploy(self, ctx) -> Dict[str, Any]:
        from runner.local.endpoint.manager import start_endpoint
        from runner.local.endpoint.settings import EndpointSettings

        from runner.local.model_identity import model_folder, verify_registered_model

        dep = self.cfg.deployment
        model_uri = RegisterResult.recorded(ctx.record).model_uri
        if model_uri:  # still the model the record registered, and its files present: before any process starts
            verify_registered_model(self.tracking_uri, ctx.record.output("register"))
        chosen = {}
        if not model_uri:  # no register step here or in from_run: the latest version, if a good run made it
            from runner.local.registry import deployable_latest

            chosen = deployable_latest(self.tracking_uri, self.cfg.mlflow.registered_model_name)
            ctx.say(f"no register step in this run (or from_run): deploying the latest version {chosen['model_uri']} "
                    f"(MLflow run {chosen['run_id']}, quality gate {chosen['quality_gate']})")
            model_uri = chosen["model_uri"]
            model_folder(self.tracking_uri, model_uri)  # its files present, before any process starts
        # the server's settings, built once here from deployment.*: the manager adds only its own files' paths
        settings = EndpointSettings.from_deployment(dep, name=self._endpoint_name(ctx),
                                                    deployments={name: model_uri for name in dep.traffic})
        state = start_endpoint(
            settings,
            state_dir=self.cfg.paths.endpoints_dir,
            startup_timeout_s=dep.startup_timeout_s,
            env={"MLFLOW_TRACKING_URI": self.tracking_uri},
            # tied to this ftrun unless asked, or unless this run has no cleanup step to delete it (steps=[deploy])
            detach=bool(dep.detach) or "cleanup" not in self.cfg.steps,
        )
        ctx.endpoint = state
        ctx.say(f"endpoint {state['name']} serving {model_uri} at {state['scoring_uri']}")
        return {**state, "model_uri": model_uri, **({"model_version": chosen["version"]} if chosen else {})}

    def _endpoint_state(self, ctx) -> Dict[str, Any]:
        from runner.local.endpoint.manager import find_endpoint

        state = ctx.endpoint or ctx.record.output("deploy")
        if self.cfg.endpoint_name:
            state = find_endpoint(self.cfg.endpoint_name, state_dir=self.cfg.paths.endpoints_dir)
            if not state:
                raise RuntimeError(f"no local endpoint named {self.cfg.endpoint_name!r} in {self.cfg.paths.endpoints_dir}")
        if not state:
            raise MissingInput("no endpoint: run the deploy step first, or name one with endpoint_name=...")
        return state

    def test(self, ctx, request_file) -> Dict[str, Any]:
        from runner.local.endpoint.manager import invoke

        state = self._endpoint_state(ctx)
        registered = ctx.record.output("register") or {}
        deployed = DeployResult.recorded(ctx.record).model_uri or state.get("model_uri")
        if registered.get("model_uri") and deployed == registered["model_uri"]:
            from runner.local.model_identity import verify_registered_model

            verify_registered_model(self.tracking_uri, registered)
        if state.get("alive") is False:  # never send the key to whatever now holds a dead server's port
            raise RuntimeError(f"endpoint {state['name']!r}: its server (pid {state['pid']}) is not running any more, "
                               f"or is not the server its state file names; deploy it again")
        request = json.loads(Path(request_file).read_text(encoding="utf-8"))
        response = invoke(state, request, deployment=self.cfg.deployment.deployment_name)
        print("raw response:\n", json.dumps(response, ensure_ascii=False), "\n", flush=True)
        for message in request["input_data"]["input_string"][0]:
            print(f"[{message['role']}] {message['content']}")
        reply = response.get("output") if isinstance(response, dict) else response
        print(f"[assistant (fine-tuned)] {reply}", flush=True)
        return {"response": response, "reply": reply}

    def score_rows(self, ctx, conversations, max_new_tokens: int) -> Dict[str, Any]:
        from runner.local.endpoint_rows import score_rows

        return score_rows(self._endpoint_state(ctx), conversations, max_new_tokens=max_new_tokens,
                          deployment=self.cfg.deployment.deployment_name)

    def cleanup(self, ctx) -> Dict[str, Any]:
        from runner.local.endpoint.manager import serve_until_interrupted, stop_endpoint

        state = self._endpoint_state(ctx)
        if self.cfg.deployment.keep_alive and not self.cfg.endpoint_name:
            ctx.say(f"keep_alive: {state['name']} keeps serving at {state['url']} until Ctrl-C")
            out = serve_until_interrupted(state, state_dir=self.cfg.paths.endpoints_dir)  # deletes it on Ctrl-C
        else:
            # the state itself, not its name: only the server this run started (its instance token) is stopped
            out = stop_endpoint(state, state_dir=self.cfg.paths.endpoints_dir)
        ctx.endpoint = None
        ctx.say(f"endpoint {state['name']} deleted")
        return out

    def export_source(self, ctx, model_uri: str, registered, work_dir) -> Dict[str, Any]:
        from runner.local.export_source import export_source

        return export_source(self.tracking_uri, model_uri, registered, work_dir)

    def log_export(self, ctx, source: Dict[str, Any], out_dir) -> Dict[str, Any]:
        from runner.local.export_source import log_export

        return log_export(self.tracking_uri, source, out_dir)

    def training_params(self, ctx) -> Optional[Dict[str, Any]]:
        """The finetune step's MLflow run's own params (right also for a finetune step of an earlier run)."""
        run_id = FinetuneResult.recorded(ctx.record).mlflow_run_id
        if not run_id:
            return None
        from runner.local.registry import run_facts

        return run_facts(self.tracking_uri, run_id).get("params", {})

    def has_endpoint(self, ctx) -> bool:
        return bool(ctx.endpoint or ctx.record.output("deploy") or self.cfg.endpoint_name)

    def plan(self, ctx) -> Dict[str, Any]:
        from runner.local.plan import write_local_plan

        return write_local_plan(ctx, self)
