"""The Azure ML backend: the seed notebook's workflow, step by step, with azure-ai-ml objects built from the config.

Every call to Azure goes through the clients returned by `AzureClients` (runner/azureml/clients.py); the objects
sent are built in runner/azureml/translate.py; the checks that stop a run before money is spent are in
runner/azureml/checks.py, tags.py and spec.py. In-process objects (the clients, the foundation model) live in
`ctx.connection` (an AzureSession); everything a later run needs (ids, names, URLs) goes into the run record.
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import OmegaConf

from runner.azureml.checks import (
    AzureStepError,
    check_deployment_name,
    check_endpoint_name,
    check_finetune_size,
    check_inference_size,
    check_memory_fit,
    check_provisioning,
    gpus_for_size,
    reconcile_gpus,
)
from runner.azureml import finetuning_job, pipeline_job
from runner.azureml.lro import finish, is_quota_error
from runner.azureml.spec import ComponentSpec, load_spec, resolve_spec_path, spec_from_dict
from runner.azureml.suggest import archived_message
from runner.azureml.tags import ModelFacts, facts_from_registry
from runner.backend_api import Backend
from runner.errors import MissingInput
from runner.finetune_params import pipeline_display_name
from runner.step_results import ConnectResult, DeployResult, FinetuneResult, ModelResult, RegisterResult
from runner.schema import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


@dataclass
class AzureSession:
    """What this process opened and looked up on Azure, reused by later steps (ctx.connection): never recorded."""

    timestamp: Optional[str] = None  # the notebook's timestamp: model version, endpoint name
    credential: Any = None
    workspace: Any = None  # the workspace MLClient
    registry: Any = None  # the `azureml` registry MLClient
    facts: Optional[ModelFacts] = None
    foundation_model: Any = None


class AzureMLBackend(Backend):
    name = "azureml"
    plans_by_running_steps = True  # dry_run: these steps, with the planning clients
    submits_jobs = True

    def __init__(self, cfg, clients=None, clock=time.time):
        self.cfg = cfg
        # None: AzureClients for a real run, or for dry_run=true the planning clients, which record every call and
        # object instead of sending it (runner/azureml/planning.py): a dry run is these same steps.
        self.clients = clients
        self.clock = clock  # the notebook's timestamp (model version, endpoint name); tests pin it
        # the route is chosen once: what finetune and register do is that route's module
        self.route = finetuning_job if cfg.finetune.route == "finetuning_job" else pipeline_job

    # ---- helpers ------------------------------------------------------------------------------------------------
    def session(self, ctx) -> "AzureSession":
        """This process's Azure session (ctx.connection): made on first use, clients connected on demand."""
        if ctx.connection is None:
            ctx.connection = AzureSession()
        return ctx.connection

    def timestamp(self, ctx) -> str:
        session = self.session(ctx)
        if session.timestamp is None:
            session.timestamp = ConnectResult.recorded(ctx.record).timestamp or str(int(self.clock()))
        return session.timestamp

    def _connect_clients(self, ctx) -> None:
        b = self.cfg.backend
        if self.clients is None:
            if self.cfg.dry_run:
                from runner.azureml.planning import planning_clients

                self.clients = planning_clients(self.cfg, ctx.plan_dir, self.spec_path())
            else:
                from runner.azureml.clients import AzureClients

                self.clients = AzureClients()
        credential = self.clients.credential(b)
        workspace = self.clients.workspace(credential, b)
        registry = self.clients.registry(credential, b.registry_name)
        session = self.session(ctx)
        session.credential, session.workspace, session.registry = credential, workspace, registry

    def ws(self, ctx):
        if self.session(ctx).workspace is None:
            self._connect_clients(ctx)
        return ctx.connection.workspace

    def registry(self, ctx):
        if self.session(ctx).registry is None:
            self._connect_clients(ctx)
        return ctx.connection.registry

    def facts(self, ctx) -> ModelFacts:
        session = self.session(ctx)
        if session.facts is None:
            recorded = ModelResult.recorded(ctx.record).facts
            if recorded:
                session.facts = ModelFacts(**recorded)
            else:
                self.model(ctx)
        return session.facts

    def spec_path(self) -> Optional[Path]:
        return resolve_spec_path(self.cfg.backend.component_spec, REPO_ROOT)

    def local_spec(self, required: bool = False) -> Optional[ComponentSpec]:
        """The component spec file of backend.component_spec (None when unset/missing and not required)."""
        path = self.spec_path()
        if path is None or not path.is_file():
            if required:
                return load_spec(str(path or self.cfg.backend.component_spec))  # raises, naming the key
            return None
        return load_spec(str(path))

    def model_specific_defaults(self, ctx) -> Dict[str, Any]:
        """The registry's model_specific_defaults tag of the foundation model (its facts): what the notebook applies
        on top of its own parameters. The merge itself is Backend.finetune_params, once per run."""
        return self.facts(ctx).model_specific_defaults

    def display_name(self, params: Dict[str, Any], gpus_per_node: int) -> str:
        return pipeline_display_name(self.cfg.model.name, params, gpus_per_node or 1)

    def endpoint_name(self, ctx) -> str:
        return self.cfg.endpoint_name or f"{self.cfg.deployment.endpoint_name_prefix}{self.timestamp(ctx)}"

    def model_checks(self, ctx, facts: ModelFacts, *, refuse_archived: bool = True) -> list:
        """The checks that need the model's facts, run as soon as they are known. Returns warnings."""
        cfg = self.cfg
        warnings = []
        if facts.archived:
            refusing = refuse_archived and not cfg.model.allow_archived
            # in a real run that is refused, the suggestions come from what the registry lists as current
            message = archived_message(facts, cfg.model, cfg=cfg,
                                       registry_models=self.registry(ctx).models if refusing and not cfg.dry_run
                                       else None)
            if refusing:
                raise ConfigError(message)
            warnings.append(message if not cfg.model.allow_archived else
                            f"model {facts.name} is archived ({'; '.join(facts.archived_because)}); going ahead "
                            f"because model.allow_archived=true")
        steps = set(cfg.steps)
        if (cfg.dry_run or steps & {"compute", "finetune"}) and cfg.compute.kind != "serverless":
            for size in list(cfg.compute.instance_types) or [cfg.compute.size]:  # finetuning_job: the sizes it may use
                check_finetune_size(size, facts.finetune_allow_list, model_name=facts.name,
                                    where="compute.instance_types" if cfg.compute.instance_types else "compute.size",
                                    source=facts.allow_list_source.get("finetune"))
        if (cfg.dry_run or "deploy" in steps) and cfg.deployment.kind != "serverless":
            check_inference_size(cfg.deployment.instance_type, facts.inference_allow_list, model_name=facts.name,
                                 source=facts.allow_list_source.get("inference"))
        return warnings

    @staticmethod
    def _refused(ctx, step: str, facts: ModelFacts, exc: BaseException) -> None:
        """A refusal's grounds go into the run record beside the error: which list, from where; or why archived."""
        from runner.azureml.checks import AllowListRefusal

        grounds = dict(exc.details) if isinstance(exc, AllowListRefusal) else {
            "check": "archived", "archived_because": list(facts.archived_because),
            "allow_list_source": dict(facts.allow_list_source)}
        ctx.record.note(step, refusal=grounds)

    # ---- steps ----------------------------------------------------------------------------------------------
    def connect(self, ctx) -> Dict[str, Any]:
        # Checks that need only the config come first: nothing is worth a login if the run cannot go through.
        self.local_spec()  # the pinned component contract, if one is set, must load (on either route)
        self.route.check_explicit_keys(self, ctx)  # each route takes its own keys
        if "deploy" in self.cfg.steps:  # the names the service would refuse, before anything is spent
            check_endpoint_name(self.endpoint_name(ctx))
            if self.cfg.deployment.kind != "serverless":
                check_deployment_name(self.cfg.deployment.deployment_name)
        self._connect_clients(ctx)
        ws = ctx.connection.workspace
        ctx.say(f"workspace {getattr(ws, 'workspace_name', '?')} (resource group "
                f"{getattr(ws, 'resource_group_name', '?')}), registry {self.cfg.backend.registry_name}, "
                f"credential {type(ctx.connection.credential).__name__}")
        return {
            "workspace_name": getattr(ws, "workspace_name", None),
            "resource_group": getattr(ws, "resource_group_name", None),
            "registry_name": self.cfg.backend.registry_name,
            "credential": type(ctx.connection.credential).__name__,
            "timestamp": self.timestamp(ctx),
        }

    def model(self, ctx) -> Dict[str, Any]:
        m = self.cfg.model
        registry = self.registry(ctx)
        if m.version:
            foundation_model = registry.models.get(m.name, version=str(m.version))
        else:
            foundation_model = registry.models.get(m.name, label=m.label)
        from runner.azureml.tags import allow_list_message, system_metadata

        body, unread = None, ""
        if not self.cfg.dry_run and not system_metadata(foundation_model) and foundation_model.version:
            # the entity lost the version's system metadata and isArchived: the registry's raw body has them
            from runner.azureml.registry_rest import model_version_body

            body, unread = model_version_body(registry.models, foundation_model.name, str(foundation_model.version))
        facts = facts_from_registry(foundation_model, m, rest_body=body)
        if unread:
            ctx.say(f"warning: the registry's REST body of {facts.name} could not be read ({unread}): its system "
                    f"metadata (allow lists, deprecation, isArchived) is unknown")
        ctx.say(allow_list_message(facts, planned=self.cfg.dry_run))  # where the lists came from, before the checks
        if ctx.record.status("model") == "running":  # a later step looking the facts up (facts()) is no model step
            ctx.record.note("model", allow_list_source=dict(facts.allow_list_source), rest_body_unread=unread or None)
        try:
            warnings = self.model_checks(ctx, facts, refuse_archived=not self.cfg.dry_run)
        except ConfigError as exc:
            self._refused(ctx, "model", facts, exc)
            raise
        warnings += self._serverless_workspace_check(ctx, foundation_model, facts)
        for w in warnings:
            ctx.say(f"warning: {w}")
        self.session(ctx).foundation_model, self.session(ctx).facts = foundation_model, facts
        ctx.say(f"foundation model {facts.asset_id}")
        return {"model_id": facts.asset_id, "name": facts.name, "version": facts.version, "facts": facts.to_dict(),
                "warnings": warnings}

    def _serverless_workspace_check(self, ctx, foundation_model, facts: ModelFacts) -> list:
        """compute=serverless: the workspace must be a project in a region the model's serverless fine-tuning
        supports, known before the job is submitted (runner/azureml/serverless_region.py). Returns warnings."""
        from runner.azure_routes import is_serverless_compute
        from runner.azureml.serverless_region import REGIONS_TAG, check_serverless_workspace, serverless_regions
        from runner.azureml.tags import preset_facts_apply

        if not is_serverless_compute(self.cfg):
            return []
        regions = serverless_regions(foundation_model, self.cfg.model, preset_facts_apply(self.cfg.model, facts.name))
        warnings = [] if regions is not None else [
            f"model {facts.name} names no {REGIONS_TAG} (registry tag or model.serverless_regions): the workspace's "
            f"region is not checked before the job is submitted"]
        from runner.azure_routes import SERVERLESS_UNLISTED

        if facts.name in SERVERLESS_UNLISTED:
            warnings.append(f"model {facts.name}: serverless fine-tuning is a stand-in here; Azure's published table "
                            f"of serverless fine-tunable models does not list it, and the service may refuse the job "
                            f"(model=phi4_mini_instruct is listed)")
        if self.cfg.dry_run:
            return warnings + [f"the workspace's region and kind are a real run's to check: it refuses a workspace "
                               f"that is not a project in {', '.join(regions or ['(unknown)'])} before submitting"]
        ws = self.ws(ctx)
        check_serverless_workspace(ws.workspaces.get(ws.workspace_name), regions, facts.name)
        return warnings

    def compute(self, ctx) -> Dict[str, Any]:
        from azure.core.exceptions import ResourceNotFoundError

        from runner.azureml.translate import build_compute

        c = self.cfg.compute
        facts = self.facts(ctx)
        if not self.route.uses_cluster(self.cfg):
            where = self.route.placement(self.cfg)["runs_on"]  # no cluster of yours to get or create
            ctx.say(f"compute: the finetuning job runs on {where}")
            return {"name": None if c.kind == "serverless" else c.name, "runs_on": where,
                    "instance_types": list(c.instance_types) or None, "gpus_per_node": c.gpus_per_node or None}
        try:
            check_finetune_size(c.size, facts.finetune_allow_list, model_name=facts.name,  # before any call
                                source=facts.allow_list_source.get("finetune"))
        except ConfigError as exc:
            self._refused(ctx, "compute", facts, exc)
            raise
        params = self.finetune_params(ctx).params()
        fit = check_memory_fit(model_name=facts.name, params=params, gpu_memory_gb=c.gpu_memory_gb,
                               gpus_per_node=c.gpus_per_node, size=c.size, memory_headroom=c.memory_headroom)
        for warning in fit["warnings"]:
            ctx.say(f"warning: {warning}")
        ctx.say(f"memory: ~{fit['estimate_gb']['total']:.1f} GB per GPU of {fit['budget_gb']:.1f} GB usable"
                if fit["checked"] else f"memory: {fit['reason']}")
        ws = self.ws(ctx)
        created = None
        try:
            compute = ws.compute.get(c.name)
            ctx.say(f"compute cluster {c.name} exists ({compute.size}); reusing it")
        except ResourceNotFoundError:
            compute = None
        if compute is not None:
            check_provisioning(compute, c.name)
            try:
                check_finetune_size(compute.size, facts.finetune_allow_list, model_name=facts.name,
                                    where=f"the existing cluster {c.name}'s size",
                                    source=facts.allow_list_source.get("finetune"))
            except ConfigError as exc:
                self._refused(ctx, "compute", facts, exc)
                raise
        else:
            created = self._create_compute(ctx, ws, build_compute)
            compute = ws.compute.get(c.name)  # sanity check of what was created, as the notebook does
            check_provisioning(compute, c.name)
        gpus = reconcile_gpus(gpus_for_size(ws.compute.list_sizes(), compute.size), c.gpus_per_node, compute.size)
        ctx.say(f"{compute.size}: {gpus} GPU(s) per node")
        return {"name": c.name, "size": compute.size, "gpus_per_node": gpus, "created_tier": created,
                "provisioning_state": getattr(compute, "provisioning_state", None), "memory_estimate": fit}

    def _create_compute(self, ctx, ws, build_compute) -> str:
        c = self.cfg.compute
        tiers = [c.tier] + (["low_priority"] if c.tier == "dedicated" and c.low_priority_fallback else [])
        errors = []
        for tier in tiers:
            ctx.say(f"creating compute cluster {c.name} ({c.size}, {tier}, max {c.max_instances} instances)")
            try:
                finish(ws.begin_create_or_update(build_compute(c, tier)), f"creating compute cluster {c.name}")
                return tier
            except Exception as exc:
                # Only the tier's quota is a reason to try the next tier (the notebook retries as low priority);
                # anything else (a refused call, a bad size, the network) would fail the same way again.
                if not is_quota_error(exc):
                    raise
                errors.append(f"{tier}: {type(exc).__name__}: {str(exc)[:300]}")
        raise AzureStepError(f"could not create compute cluster {c.name} of size {c.size} in the workspace: "
                           + "; ".join(errors))

    def data(self, ctx, data: Dict[str, Any]) -> Dict[str, Any]:
        """The train/test files the pipeline job uploads: messages rows, as the component documents them. Rows
        with other keys (a user's own columns) are uploaded from a messages-only copy in the run dir; ultrachat's
        prompt/prompt_id ride along as they always have."""
        from runner.data.upload import messages_only

        inputs, out = {}, {}
        for key, field in (("train_file_path", "train_file"), ("test_file_path", "test_file")):
            path = data.get(field)
            if path and self.cfg.dry_run and not Path(path).is_file():  # planned, not downloaded: upload as is
                inputs[key] = {"type": "uri_file", "path": str(Path(path).resolve())}
                continue
            if not path or not Path(path).is_file():
                raise MissingInput(f"the data step did not produce its {field} ({path!r})")
            upload = messages_only(path, Path(ctx.run_dir).resolve() / "data" / "upload" / Path(path).name)
            if upload != Path(path):
                out[field], out[f"data_{field}"] = str(upload), str(path)  # finetune uploads the copy
                ctx.say(f"{field}: uploading a messages-only copy, {upload}")
            inputs[key] = {"type": "uri_file", "path": str(Path(upload).resolve())}
        ctx.say("train/test files are uploaded by the job submission as uri_file inputs")
        return {**out, "azure_inputs": inputs}

    def finetune(self, ctx) -> Dict[str, Any]:
        return self.route.finetune(self, ctx)

    # ---- a submitted job: followed, and picked up again -------------------------------------------------------
    def continue_hint(self, ctx, job_name: str) -> str:
        return (f"continue with the same command and finetune.attach_job={job_name}, or "
                f"from_run={ctx.record.data.get('run_dir') or ctx.run_dir}")

    def job_to_attach(self, ctx) -> tuple:
        """(job name, why) of a submitted job this run continues from instead of submitting: finetune.attach_job, or
        the from_run record's finetune step that submitted a job and was cut short. (None, "") otherwise."""
        if self.cfg.finetune.attach_job:
            return str(self.cfg.finetune.attach_job), "finetune.attach_job"
        earlier = (ctx.record.earlier.get("steps") or {}).get("finetune") or {}
        if earlier.get("status") != "ok" and earlier.get("job_name"):
            return str(earlier["job_name"]), f"from_run={ctx.record.earlier.get('run_dir')}"
        return None, ""

    def continuable_job(self, ctx, job_name: str, why: str, kind: str) -> Optional[tuple]:
        """(job, outputs) of a submitted `kind` job (pipeline, finetuning) this run continues from, its name noted in
        the record; None when a from_run's job ended without a model, so a new one is submitted (an explicit
        finetune.attach_job to such a job is an error). Both routes' _attach start here."""
        from azure.core.exceptions import ResourceNotFoundError

        ws = self.ws(ctx)
        try:
            job = ws.jobs.get(job_name)
        except ResourceNotFoundError as exc:
            raise AzureStepError(f"{why}: there is no job {job_name} in workspace "
                                 f"{getattr(ws, 'workspace_name', '?')}") from exc
        status = getattr(job, "status", None)
        url = getattr(job, "studio_url", None)
        if status in ("Failed", "Canceled"):
            if why == "finetune.attach_job":
                raise AzureStepError(f"finetune.attach_job={job_name}: the job is {status} (studio: {url}); drop "
                                     f"finetune.attach_job to submit a new one")
            ctx.say(f"the {kind} job {job_name} of {why} is {status}: submitting a new one")
            return None
        ctx.say(f"attaching to {kind} job {job_name} ({status}, {why}): not submitting a new one")
        earlier = ctx.record.noted("finetune", "submitted") or {}
        out = {"job_name": job_name, "studio_url": url or earlier.get("studio_url"),
               "display_name": getattr(job, "display_name", None) or earlier.get("display_name"),
               "experiment_name": getattr(job, "experiment_name", None) or earlier.get("experiment_name"),
               "attached": why, "status": "submitted"}
        return job, out, earlier

    def component_spec(self, component) -> tuple:
        """(the live component's inputs (its own spec), ""); (the pinned contract, why) if the entity cannot be
        read: then the run is checked against the contract alone, which the caller must say."""
        try:
            return spec_from_dict(component._to_dict(), source=f"registry {self.cfg.backend.registry_name}"), ""
        except Exception as exc:
            pinned = self.local_spec(required=True)
            return pinned, (f"the registry's component {self.cfg.backend.component_name} could not be read "
                            f"({type(exc).__name__}: {str(exc)[:200]}); checked against the pinned contract "
                            f"{pinned.name} {pinned.version} ({pinned.source}) only")

    def job_name(self, ctx) -> str:
        return FinetuneResult.require(ctx.record, "no fine-tuning job in this run's record", needs="job_name").job_name

    def require_completed(self, ctx, job_name: str) -> None:
        finetuned = FinetuneResult.recorded(ctx.record)
        if finetuned.status == "Completed":
            return
        status = getattr(self.ws(ctx).jobs.get(job_name), "status", None)
        if status not in ("Completed", "Failed", "Canceled") and self.cfg.backend.wait:
            # A job submitted earlier with backend.wait=false (e.g. by a sweep): wait for it now.
            ctx.say(f"waiting for pipeline job {job_name} ({status})")
            self.ws(ctx).jobs.stream(job_name)
            status = getattr(self.ws(ctx).jobs.get(job_name), "status", None)
        if status != "Completed":
            raise AzureStepError(f"pipeline job {job_name} is {status}, not Completed: wait for it (studio: "
                               f"{finetuned.studio_url}) and rerun these steps with "
                               f"from_run={ctx.record.data.get('from_run') or ctx.run_dir}")

    def metrics(self, ctx) -> Dict[str, Any]:
        from runner.azureml.metrics import read_job_metrics

        if self.cfg.dry_run:  # nothing is sent here: the job's metrics are read from the workspace's MLflow
            ctx.say("metrics: read from the workspace's MLflow once the job has run")
            return {"planned": "read from the workspace's MLflow (the pipeline job's child runs)"}
        job_name = self.job_name(ctx)
        self.require_completed(ctx, job_name)
        ws = self.ws(ctx)
        tracking_uri = ws.workspaces.get(ws.workspace_name).mlflow_tracking_uri
        history = read_job_metrics(tracking_uri, job_name, credential=self.session(ctx).credential)
        if not history and self.cfg.compute.kind == "serverless":
            # a serverless job trains on Azure's capacity, not in this workspace: its curves may not be here
            ctx.say(f"warning: finetuning job {job_name} logged no metrics to this workspace's MLflow (serverless: "
                    f"see the job's metrics in the studio); going on")
            return {"job_name": job_name, "metrics": [], "final": {}}
        if not history:
            raise AzureStepError(f"pipeline job {job_name} logged no metrics to {tracking_uri.split('/mlflow')[0]}")
        from runner.metrics_report import report

        title = FinetuneResult.recorded(ctx.record).display_name or job_name
        out = dict(report(history, ctx.run_dir, title=title))
        print(out["table"], flush=True)
        ctx.say(f"loss curve: {out['plot']}")
        out["metrics"] = sorted(history)
        out["job_name"] = job_name
        return out

    def evaluate(self, ctx, job) -> Dict[str, Any]:
        from runner.azureml import evaluate

        from runner.azure_routes import is_serverless_compute

        if is_serverless_compute(self.cfg):
            from runner.azureml import serverless_evaluate  # no cluster: both models behind serverless endpoints

            return serverless_evaluate.evaluate(self, ctx, job)
        return evaluate.evaluate(self, ctx, job)

    def register(self, ctx) -> Dict[str, Any]:
        return self.route.register(self, ctx)

    def deploy(self, ctx) -> Dict[str, Any]:
        from runner.azureml.translate import build_deployment, build_endpoint

        d = self.cfg.deployment
        if d.kind == "serverless":
            from runner.azureml import serverless

            return serverless.deploy(self, ctx)
        facts = self.facts(ctx)
        try:
            check_inference_size(d.instance_type, facts.inference_allow_list, model_name=facts.name,
                                 source=facts.allow_list_source.get("inference"))
        except ConfigError as exc:
            self._refused(ctx, "deploy", facts, exc)
            raise
        registered = RegisterResult.require(ctx.record, "no registered model to deploy", needs="model_id")
        model_id, model_name = registered.model_id, registered.name
        name = self.endpoint_name(ctx)
        check_endpoint_name(name)
        ws = self.ws(ctx)
        endpoint = build_endpoint(name=name, registered_model_name=model_name, auth_mode=d.auth_mode)
        ctx.say(f"creating endpoint {name}")
        finish(ws.begin_create_or_update(endpoint), f"creating endpoint {name}")
        try:
            deployment = build_deployment(d, endpoint_name=name, model_id=model_id)
            ctx.say(f"creating deployment {d.deployment_name} ({d.instance_type} x{d.instance_count})")
            finish(ws.online_deployments.begin_create_or_update(deployment), f"creating deployment {d.deployment_name}")
            endpoint.traffic = dict(OmegaConf.to_container(d.traffic))
            result = finish(ws.begin_create_or_update(endpoint), f"routing traffic of endpoint {name}",
                            needs=("scoring_uri",))
        except BaseException:
            # The endpoint exists but cannot serve: delete it rather than leave it billing.
            ctx.say(f"deployment failed; deleting endpoint {name}")
            try:
                finish(ws.online_endpoints.begin_delete(name=name), f"deleting endpoint {name}")
            except Exception as exc:
                ctx.say(f"warning: could not delete endpoint {name}: {exc}")
            raise
        return {"endpoint_name": name, "deployment_name": d.deployment_name,
                "scoring_uri": getattr(result, "scoring_uri", None), "traffic": dict(endpoint.traffic)}

    def endpoint_in_use(self, ctx) -> Optional[str]:
        return DeployResult.recorded(ctx.record).endpoint_name or self.cfg.endpoint_name

    def test(self, ctx, request_file) -> Dict[str, Any]:
        from runner.azureml.scoring import extract_reply

        if self.cfg.deployment.kind == "serverless":
            from runner.azureml import serverless

            return serverless.test(self, ctx, request_file)
        name = self.endpoint_in_use(ctx)
        if not name:
            raise MissingInput("no endpoint to test: run the deploy step, from_run=<run dir>, or endpoint_name=...")
        deployment = DeployResult.recorded(ctx.record).deployment_name or self.cfg.deployment.deployment_name
        raw = self.ws(ctx).online_endpoints.invoke(endpoint_name=name, deployment_name=deployment,
                                                   request_file=str(request_file))
        print(f"    raw response: {raw}", flush=True)
        reply = extract_reply(raw)
        return {"endpoint_name": name, "reply": reply, "raw_response": str(raw)[:4000]}

    def score_rows(self, ctx, conversations, max_new_tokens: int) -> Dict[str, Any]:
        from runner.azureml.endpoint_rows import score_rows

        return score_rows(self, ctx, conversations, max_new_tokens)

    def cleanup(self, ctx) -> Dict[str, Any]:
        name = self.endpoint_in_use(ctx)
        ws = self.ws(ctx)
        out: Dict[str, Any] = {"deleted": None, "compute_deleted": None}
        if name and self.cfg.deployment.kind == "serverless":
            from runner.azureml import serverless

            serverless.cleanup(self, ctx, name)
            out["deleted"] = name
        elif name:
            ctx.say(f"deleting endpoint {name}")
            finish(ws.online_endpoints.begin_delete(name=name), f"deleting endpoint {name}")
            out["deleted"] = name
        else:
            ctx.say("no endpoint to delete")
        if self.cfg.compute.kind == "serverless":
            pass  # no cluster of yours
        elif self.cfg.cleanup.delete_compute:
            ctx.say(f"deleting compute cluster {self.cfg.compute.name}")
            finish(ws.compute.begin_delete(self.cfg.compute.name), f"deleting compute cluster {self.cfg.compute.name}")
            out["compute_deleted"] = self.cfg.compute.name
        else:
            ctx.say(f"compute cluster {self.cfg.compute.name} kept (cleanup.delete_compute=true deletes it)")
        return out

    def export_source(self, ctx, model_uri: str, registered, work_dir) -> Dict[str, Any]:
        from runner.azureml.export_source import export_source

        return export_source(self, ctx, model_uri, registered, work_dir)

    def log_export(self, ctx, source: Dict[str, Any], out_dir) -> Dict[str, Any]:
        from runner.azureml.export_source import log_export

        return log_export(self, ctx, source, out_dir)

    def finish_plan(self, ctx) -> Dict[str, Any]:
        from runner.azureml.plan_summary import write_plan_summary

        return write_plan_summary(ctx, self.clients.world, self.route)
