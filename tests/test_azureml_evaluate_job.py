"""The Azure ML evaluate command job: built with azure-ai-ml, dumped to YAML that load_job reads back unchanged."""

import pytest

from runner.azureml.evaluate_job import (DEFAULT_ENVIRONMENT, build_evaluate_job, evaluate_command,
                                         evaluate_job_yaml, job_output_path, registry_model_path, stage_code)
from tests.test_azureml_finetuning_job import quiet_load

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
    assert (code / "runner" / "evaluation" / "job.py").is_file()
    assert (code / "runner" / "local" / "evaluator.py").is_file()
    assert not list(code.rglob("__pycache__"))


@pytest.mark.parametrize("key", ["evaluate.azureml_environment"])
def test_the_environment_comes_from_config(key):
    from tests.conftest import compose_cfg

    assert compose_cfg().evaluate.azureml_environment == DEFAULT_ENVIRONMENT
    assert compose_cfg([f"{key}=azureml:my-env:3"]).evaluate.azureml_environment == "azureml:my-env:3"
