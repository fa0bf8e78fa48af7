"""The evaluate step on the serverless finetuning-job route (finetune.route=finetuning_job, e.g.
experiment=phi4_mini_serverless): there is no cluster and the fine-tuned weights never leave Azure's serverless
capacity, so both models are scored the one way they can be reached: each behind a serverless endpoint of its own
(the base model's registry id, the fine-tuned model as the job registered it), the same held-out rows sent to both
through the chat-completions route, greedy (temperature 0) with `evaluate.max_new_tokens`. The replies are scored
here with the evaluator's own metrics, paired bootstrap and verdicts (runner/evaluation/), and the four files are
written into <run dir>/evaluate/ as on the local backend.

Only the generated metrics exist on this route (ROUGE-L, BLEU, chrF, exact match, reply length, stop rate): an
endpoint returns replies, not the log-likelihood of a given reference, so loss, perplexity and token accuracy are
left out, with a note. Both endpoints are deleted when the step ends, whatever happened (a serverless endpoint
bills per token; a fine-tuned model's also per hour of hosting). A dry run plans both endpoints
(plan/evaluate_base_endpoint.yaml, plan/evaluate_ft_endpoint.yaml) and sends nothing.
"""

import re
from typing import Any, Dict, List

from runner.azureml.checks import AzureStepError
from runner.step_results import ModelResult

ROLES = {"evb": "evaluate_base_endpoint", "evf": "evaluate_ft_endpoint"}  # endpoint name suffix -> plan file


def plan_kind(endpoint_name: str) -> str:
    """The plan file a serverless endpoint is written to: the evaluate step's two, or the deployed one."""
    return ROLES.get(str(endpoint_name).rsplit("-", 1)[-1], "serverless_endpoint")


def registry_model_id(model_id: str) -> str:
    """A serverless endpoint names a registry model without its version (the SDK refuses a versioned one)."""
    return re.sub(r"/versions/[^/]+$", "", model_id)


def _endpoint_names(backend: Any, ctx: Any) -> Dict[str, str]:
    base = backend.endpoint_name(ctx)[:28].rstrip("-")
    return {suffix: f"{base}-{suffix}" for suffix in ROLES}


def _chat(backend: Any, url: str, key: str, messages: List[dict], max_new_tokens: int):
    from runner.azureml.serverless import chat_reply
    from runner.evaluation.metrics import RowOutput

    body = {"messages": messages, "temperature": 0, "max_tokens": max_new_tokens}
    response = backend.clients.post_json(url, body, {"Authorization": f"Bearer {key}"},
                                         backend.cfg.deployment.request_timeout_ms / 1000)
    choice = (response.get("choices") or [{}])[0]
    tokens = (response.get("usage") or {}).get("completion_tokens")
    return RowOutput(reply=chat_reply(response), stopped=choice.get("finish_reason") == "stop", reply_tokens=tokens)


def _create(backend: Any, ctx: Any, name: str, model_id: str) -> str:
    from runner.azureml.lro import finish
    from runner.azureml.serverless import build_serverless_endpoint

    ctx.say(f"creating serverless endpoint {name} for {model_id}")
    finish(backend.ws(ctx).serverless_endpoints.begin_create_or_update(
        build_serverless_endpoint(name=name, model_id=model_id)), f"creating serverless endpoint {name}")
    return name


def _score(backend: Any, ctx: Any, job: Any, names: Dict[str, str]):
    from runner.azureml.serverless import CHAT_PATH
    from runner.evaluation.metrics import resolve_metrics
    from runner.evaluation.results import evaluate_outputs
    from runner.evaluation.rows import load_rows

    e = backend.cfg.evaluate
    rows = load_rows(job.rows_file, max_rows=e.max_rows, seed=e.seed, train_file=job.train_file)
    ws = backend.ws(ctx)
    routes = {}
    for suffix, name in names.items():
        endpoint = ws.serverless_endpoints.get(name)
        routes[suffix] = (f"{str(endpoint.scoring_uri).rstrip('/')}{CHAT_PATH}",
                          ws.serverless_endpoints.get_keys(name).primary_key)  # never printed or recorded
    outputs: Dict[str, list] = {"evb": [], "evf": []}
    for i, row in enumerate(rows, 1):
        for suffix, (url, key) in routes.items():
            outputs[suffix].append(_chat(backend, url, key, row.prompt, e.max_new_tokens))
        ctx.say(f"evaluate: {i}/{len(rows)} rows (base + fine-tuned)")
    metrics = [m for m in resolve_metrics(list(e.metrics)) if m.kind == "generated"]
    if any(o.reply_tokens is None for side in outputs.values() for o in side):  # a reply without `usage`
        ctx.say("note: the endpoints did not say how many tokens each reply took: reply_length left out")
        metrics = [m for m in metrics if m.name != "reply_length"]
    return evaluate_outputs(rows, outputs["evb"], outputs["evf"], metrics, seed=e.seed, resamples=e.resamples,
                            info={"mode": "serverless endpoints", "rows_file": job.rows_file})


def evaluate(backend: Any, ctx: Any, job: Any) -> Dict[str, Any]:
    from runner.azureml import finetuning_job
    from runner.azureml.lro import finish
    from runner.azureml.serverless import workspace_model_id

    dropped = [m for m in backend.cfg.evaluate.metrics if m in ("loss", "perplexity", "token_accuracy")]
    if dropped:
        ctx.say(f"note: {dropped} need the model's log-likelihoods, which a serverless endpoint does not return: "
                f"scored by replies only on this route")
    base_model = ModelResult.recorded(ctx.record).model_id
    if not base_model:
        raise AzureStepError("the evaluate step needs the model step's registry model: run steps=[model,...]")
    ft = finetuning_job.register(backend, ctx)  # the model the job registered (looked up, not registered again)
    ws = backend.ws(ctx)
    workspace = ws.workspaces.get(ws.workspace_name)
    models = {"evb": registry_model_id(base_model),
              "evf": workspace_model_id(location=workspace.location, workspace_id=workspace._workspace_id,
                                        name=ft["name"], version=ft["version"])}
    names = _endpoint_names(backend, ctx)
    out: Dict[str, Any] = {"endpoints": dict(names), "base_model": models["evb"], "fine_tuned": models["evf"],
                           "dropped_metrics": dropped}
    created = []
    try:
        for suffix, name in names.items():
            created.append(_create(backend, ctx, name, models[suffix]))
        if backend.cfg.dry_run:
            return out
        from runner.evaluation.report import metrics_document, write_outputs

        evaluation = _score(backend, ctx, job, names)
        paths = write_outputs(evaluation, job.out_dir)
        return {**out, "document": metrics_document(evaluation), "paths": paths}
    finally:
        for name in created:
            ctx.say(f"deleting serverless endpoint {name}")
            finish(ws.serverless_endpoints.begin_delete(name=name), f"deleting serverless endpoint {name}")
