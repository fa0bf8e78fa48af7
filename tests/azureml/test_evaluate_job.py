"""The Azure ML evaluate command job: built with azure-ai-ml, dumped to YAML that load_job reads back unchanged."""

import pytest

from runner.azureml.evaluate_job import (DEFAULT_ENVIRONMENT, build_evaluate_job, evaluate_command,
                                         evaluate_job_yaml, job_output_path, registry_model_path, stage_code)
from tests.azureml.test_finetuning_job import quiet_load

SETTINGS = {"max_rows": 64, "max_new_tokens": 96, "batch_size": 8, "seed": 7, "time_budget_s": 900.0,
            "metrics": ["loss", "rouge_l"], "do_sample": False, "temperature": 1.0, "top_p": 1.0, "resamples": 1000}


def _job(tmp_path):
    rows = tmp_path / "test_sft.jsonl"
    rows.write_text('{"messages": []}\n')
    code = stage_code(tmp_path / "code")
    job = build_evaluate_job(
        code_dir=code, compute="gpu-cluster", settings=SETTINGS, rows_path=str(rows),
        base_model_path=registry_model_path("azureml", "Phi-3-mini-4k-instruct", "15"),
        ft_model_path=job_output_path("PIPELINE_JOB_NAME", "trained_model"),
        environment=DEFAULT_ENVIRONMENT, experiment_name="chat_completion_Phi-3-mini-4k-instruct")
    return job, rows, code


def test_the_job_yaml_loads_back_with_load_job(tmp_path):
    from azure.ai.ml import load_job

    from runner.azureml.planning import write_yaml

    job, rows, code = _job(tmp_path)
    path = write_yaml(tmp_path / "plan" / "evaluate_job.yaml", evaluate_job_yaml(job))
    loaded = quiet_load(load_job, path)
    assert loaded.type == "command"
    assert loaded.inputs["base_model"].type == "mlflow_model"
    assert loaded.inputs["base_model"].path == "azureml://registries/azureml/models/Phi-3-mini-4k-instruct/versions/15"
    assert loaded.inputs["ft_model"].type == "mlflow_model"
    assert loaded.inputs["ft_model"].path == "azureml://jobs/PIPELINE_JOB_NAME/outputs/trained_model"
    assert loaded.inputs["rows"].type == "uri_file" and loaded.inputs["rows"].path == str(rows)  # uploaded, not an asset
    assert loaded.outputs["evaluation"].type == "uri_folder"
    assert loaded.environment == DEFAULT_ENVIRONMENT and loaded.compute == "gpu-cluster"
    assert str(loaded.code) == str(code) and loaded.experiment_name == "chat_completion_Phi-3-mini-4k-instruct"
    assert loaded.command == job.command
    assert loaded._validate().passed
    # dumping the loaded job again gives the same YAML: nothing was lost on the way
    assert evaluate_job_yaml(loaded._to_job() if hasattr(loaded, "_to_job") else loaded) == evaluate_job_yaml(job)


def test_the_command_runs_the_projects_evaluator_with_the_settings():
    command = evaluate_command(SETTINGS)
    assert command.startswith("python -m runner.local.evaluate_program --base ${{inputs.base_model}} "
                              "--ft ${{inputs.ft_model}} --rows ${{inputs.rows}} --out ${{outputs.evaluation}}")
    for flag in ("--max-rows 64", "--max-new-tokens 96", "--batch-size 8", "--seed 7", "--metrics loss,rouge_l",
                 "--device cuda", "--resamples 1000"):
        assert flag in command
    assert "--do-sample" not in command and "--do-sample" in evaluate_command({**SETTINGS, "do_sample": True})
    # every flag the command uses is one the program accepts
    from runner.local.evaluate_program import parse_args

    args = parse_args(evaluate_command(SETTINGS).replace("${{inputs.", "/x/").replace("${{outputs.", "/y/")
                      .replace("}}", "").split()[3:])
    assert args.max_rows == 64 and args.metrics == "loss,rouge_l" and args.device == "cuda" and args.ft == "/x/ft_model"


def test_staged_code_is_the_runner_package_alone(tmp_path):
    code = stage_code(tmp_path / "code")
    assert sorted(p.name for p in code.iterdir()) == ["runner"]
    assert (code / "runner" / "local" / "evaluate_program.py").is_file()
    assert (code / "runner" / "local" / "evaluator.py").is_file()
    assert not list(code.rglob("__pycache__"))


@pytest.mark.parametrize("key", ["evaluate.azureml_environment"])
def test_the_environment_comes_from_config(key):
    from tests.conftest import compose_cfg

    assert compose_cfg().evaluate.azureml_environment == DEFAULT_ENVIRONMENT
    assert compose_cfg([f"{key}=azureml:my-env:3"]).evaluate.azureml_environment == "azureml:my-env:3"


# ---- the evaluate step on azureml, against the SDK-faithful double ------------------------------------------------

def test_the_evaluate_job_is_submitted_after_the_fine_tune_and_its_figures_read_back(tmp_path):
    """A real run (the double): the command job goes to Azure after the fine-tune job has completed, over the
    registry base model and the pipeline's trained_model output; the record's figures and verdicts are the ones the
    job logged to the workspace's MLflow (its run id is the job's name)."""
    from runner.azureml.backend import AzureMLBackend
    from runner.workflow import run
    from tests.azureml.double import AzureWorld
    from tests.azureml.test_workflow import TIMESTAMP, compose, earlier_run_with_data

    data_run, _ = earlier_run_with_data(tmp_path)
    world = AzureWorld()
    logged = {"eval_rows": 50, "eval_base_rouge_l": 0.2, "eval_ft_rouge_l": 0.5, "eval_delta_rouge_l": 0.3,
              "eval_delta_ci_low_rouge_l": 0.2, "eval_delta_ci_high_rouge_l": 0.4, "eval_base_loss": 2.0,
              "eval_ft_loss": 2.1, "eval_delta_loss": 0.1, "eval_delta_ci_low_loss": 0.05,
              "eval_delta_ci_high_loss": 0.15}
    job_name = world.log_evaluation(tmp_path / "ws-mlflow", logged)
    cfg, overrides = compose(tmp_path, "steps=[connect,model,compute,finetune,evaluate,register]",
                             f"from_run={data_run}", "evaluate.metrics=[rouge_l,loss]",
                             "register.require_improvement=rouge_l")
    record = run(cfg, run_dir=tmp_path / "run", task_overrides=overrides,
                 backend=AzureMLBackend(cfg, clients=world.clients(), clock=lambda: TIMESTAMP))
    submitted = [c for c in world.calls if c.name == "workspace.jobs.create_or_update"]
    assert [getattr(c.args[0] if c.args else c.kwargs["job"], "type", None) for c in submitted] == ["pipeline",
                                                                                                  "command"]
    command = submitted[1].args[0] if submitted[1].args else submitted[1].kwargs["job"]
    assert command.inputs["ft_model"].path == f"azureml://jobs/{world.job_name}/outputs/trained_model"
    assert command.inputs["base_model"].path.startswith("azureml://registries/azureml/models/Phi-3-mini-4k-instruct/")
    evaluate = record.output("evaluate")
    assert evaluate["job_name"] == job_name and evaluate["rows"] == 50
    assert evaluate["verdicts"] == {"rouge_l": "better", "loss": "worse"}
    assert evaluate["figures"]["rouge_l"]["ft"] == pytest.approx(0.5)
    assert record.output("register", "quality_gate") == "passed"  # rouge_l better: the gate lets it through


def test_a_worse_verdict_read_back_from_azure_is_refused_by_the_gate(tmp_path):
    from runner.azureml.backend import AzureMLBackend
    from runner.record import load_record
    from runner.steps.register import RegisterRefused
    from runner.workflow import run
    from tests.azureml.double import AzureWorld
    from tests.azureml.test_workflow import TIMESTAMP, compose, earlier_run_with_data

    data_run, _ = earlier_run_with_data(tmp_path)
    world = AzureWorld()
    world.log_evaluation(tmp_path / "ws-mlflow", {
        "eval_rows": 50, "eval_base_rouge_l": 0.5, "eval_ft_rouge_l": 0.1, "eval_delta_rouge_l": -0.4,
        "eval_delta_ci_low_rouge_l": -0.5, "eval_delta_ci_high_rouge_l": -0.3})
    cfg, overrides = compose(tmp_path, "steps=[connect,model,compute,finetune,evaluate,register]",
                             f"from_run={data_run}", "evaluate.metrics=[rouge_l]",
                             "register.require_improvement=rouge_l")
    with pytest.raises(RegisterRefused, match="ROUGE-L is worse than the base model"):
        run(cfg, run_dir=tmp_path / "run", task_overrides=overrides,
            backend=AzureMLBackend(cfg, clients=world.clients(), clock=lambda: TIMESTAMP))
    assert load_record(tmp_path / "run")["steps"]["register"]["status"] == "refused"
    assert not world.find("workspace.models.create_or_update")  # nothing registered


def test_test_rows_scores_the_managed_endpoint_on_held_out_rows(tmp_path):
    """test.rows=2 on a managed online endpoint: one scoring request per held-out row (greedy, evaluate's
    max_new_tokens), each reply read and scored; the endpoint is still deleted after."""
    import json

    from runner.azureml.backend import AzureMLBackend
    from runner.workflow import run
    from tests.azureml.double import AzureWorld
    from tests.azureml.test_workflow import TIMESTAMP, compose, earlier_run_with_data

    data_run, _ = earlier_run_with_data(tmp_path)
    world = AzureWorld()
    cfg, overrides = compose(tmp_path, "steps=[connect,model,compute,finetune,register,deploy,test,cleanup]",
                             f"from_run={data_run}", "test.rows=2", "evaluate.max_new_tokens=40")
    record = run(cfg, run_dir=tmp_path / "run", task_overrides=overrides,
                 backend=AzureMLBackend(cfg, clients=world.clients(), clock=lambda: TIMESTAMP))
    invokes = world.find("workspace.online_endpoints.invoke")
    assert len(invokes) == 3  # the sample request, then the two rows
    row_request = json.loads(open(invokes[1].kwargs["request_file"]).read())
    assert row_request["input_data"]["parameters"] == {"do_sample": False, "max_new_tokens": 40}
    assert row_request["input_data"]["input_string"] == [[{"role": "user", "content": "Hi"}]]
    test = record.output("test")
    assert test["rows"] == 2 and list(test["endpoint_metrics"]) == ["score"]
    assert set(test["endpoint_metrics"]["score"]) == {"rouge_l", "bleu", "chrf", "exact_match"}  # text-only route
    assert test["endpoint_metrics"]["score"]["exact_match"] == 0.0  # "Hello from the endpoint" vs "Hello!"
    assert world.names()[-2:] == ["workspace.online_endpoints.begin_delete",
                                  "workspace.online_endpoints.begin_delete.result"]


def test_the_phi3_ultrachat_dry_run_plans_a_loadable_evaluate_job(tmp_path):
    """`ftrun experiment=phi3_ultrachat dry_run=true`: plan/evaluate_job.yaml is a command job load_job reads back,
    after the pipeline job, on its cluster, over the pipeline's output model and the registry base model."""
    from azure.ai.ml import load_job

    from runner.workflow import run
    from tests.conftest import compose_cfg

    overrides = ["experiment=phi3_ultrachat", "dry_run=true", "dataset=sample"]
    run(compose_cfg(overrides), run_dir=tmp_path / "run", task_overrides=overrides)
    plan = tmp_path / "run" / "plan"
    job = quiet_load(load_job, plan / "evaluate_job.yaml")
    assert job.type == "command" and job.compute == "gpu-cluster-big"
    assert job.inputs["ft_model"].path == "azureml://jobs/PIPELINE_JOB_NAME/outputs/trained_model"
    assert job.inputs["base_model"].path.startswith("azureml://registries/azureml/models/Phi-3-mini-4k-instruct/")
    assert job.inputs["rows"].path.endswith("test_sft.jsonl") and "--device cuda" in job.command
    import yaml

    calls = [c["call"] for c in yaml.safe_load((plan / "plan.yaml").read_text())["calls"]]
    submitted = [i for i, c in enumerate(calls) if c == "workspace.jobs.create_or_update"]
    assert len(submitted) == 2 and calls.index("workspace.jobs.stream") < submitted[1]  # after the fine-tune
