"""The spine: step selection and order, the run record, picking up an earlier run, failure handling, dry run."""

import json
import subprocess
import sys

import pytest

from runner.backend_api import Backend
from runner.record import load_record
from runner.schema import STEPS
from runner.workflow import run
from tests.conftest import REPO, compose_cfg


class RecordingBackend(Backend):
    """Answers every step with a small dict and remembers the order of calls."""

    name = "recording"

    def __init__(self, fail_at=None):
        self.calls = []
        self.fail_at = fail_at

    def _step(self, name, ctx):
        self.calls.append(name)
        if name == self.fail_at:
            raise RuntimeError(f"{name} broke")
        return {"step": name}

    def connect(self, ctx):
        return self._step("connect", ctx)

    def model(self, ctx):
        return self._step("model", ctx)

    def compute(self, ctx):
        return self._step("compute", ctx)

    def data(self, ctx, data):
        self.calls.append("data")
        return {}

    def finetune(self, ctx):
        out = self._step("finetune", ctx)
        return {**out, "eval_loss": 1.25}

    def metrics(self, ctx):
        return self._step("metrics", ctx)

    def register(self, ctx):
        out = self._step("register", ctx)
        return {**out, "model_uri": "models:/m/7"}

    def deploy(self, ctx):
        out = self._step("deploy", ctx)
        return {**out, "model_uri": ctx.record.output("register", "model_uri")}

    def test(self, ctx, request_file):
        return self._step("test", ctx)

    def cleanup(self, ctx):
        return self._step("cleanup", ctx)

    def plan(self, ctx):
        return self._step("plan", ctx)


def test_selected_steps_run_in_workflow_order(tmp_path):
    backend = RecordingBackend()
    cfg = compose_cfg(["steps=[register,finetune,data,model]"])
    record = run(cfg, run_dir=tmp_path, backend=backend)
    assert backend.calls == ["model", "data", "finetune", "register"]
    saved = load_record(tmp_path)
    assert saved["status"] == "ok"
    assert list(saved["steps"]) == ["model", "data", "finetune", "register"]
    for entry in saved["steps"].values():
        assert entry["status"] == "ok" and entry["seconds"] >= 0
    assert saved["steps"]["register"]["outputs"]["model_uri"] == "models:/m/7"
    assert record.objective() == 1.25
    assert (tmp_path / "resolved_config.yaml").read_text().count("learning_rate") >= 1


def test_later_run_picks_up_an_earlier_runs_outputs(tmp_path):
    run(compose_cfg(["steps=[register]"]), run_dir=tmp_path / "first", backend=RecordingBackend())
    record = run(compose_cfg(["steps=[deploy]", f"from_run={tmp_path / 'first'}"]), run_dir=tmp_path / "second",
                 backend=RecordingBackend())
    assert record.output("deploy", "model_uri") == "models:/m/7"
    assert load_record(tmp_path / "second")["from_run"] == str((tmp_path / "first").resolve())


def test_a_failed_step_is_recorded_and_a_deployed_endpoint_is_released(tmp_path):
    backend = RecordingBackend(fail_at="test")
    data = tmp_path / "data"
    data.mkdir()
    row = {"prompt": "Hi?", "prompt_id": "0" * 64,
           "messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    (data / "test_gen.jsonl").write_text(json.dumps(row) + "\n")
    cfg = compose_cfg(["steps=[register,deploy,test,cleanup]", f"dataset.download_dir={data}"])
    with pytest.raises(RuntimeError, match="test broke"):
        run(cfg, run_dir=tmp_path, backend=backend)
    assert backend.calls == ["register", "deploy", "test", "cleanup"]  # cleanup ran although test failed
    saved = load_record(tmp_path)
    assert saved["status"] == "failed" and saved["error"]["step"] == "test"
    assert saved["steps"]["test"]["status"] == "failed" and "test broke" in saved["steps"]["test"]["error"]
    assert saved["steps"]["cleanup"]["status"] == "ok"


def test_dry_run_runs_no_step(tmp_path):
    backend = RecordingBackend()
    run(compose_cfg(["dry_run=true"]), run_dir=tmp_path, backend=backend)
    assert backend.calls == ["plan"]


def test_every_step_has_a_name_in_the_schema():
    assert STEPS == ["connect", "model", "compute", "data", "finetune", "metrics", "evaluate", "register", "export",
                     "deploy", "test", "cleanup"]


def test_local_dry_run_writes_a_plan_without_heavy_imports(tmp_path):
    code = (
        "import sys; sys.argv=['ftrun','dry_run=true','hydra.run.dir=%s'];"
        "from runner.cli import main; main();"
        "print('HEAVY', sorted(m for m in ('torch','transformers','mlflow','azure.ai.ml') if m in sys.modules))"
    ) % (tmp_path / "run")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    plan = tmp_path / "run" / "plan"
    assert (plan / "plan.yaml").exists()
    request = json.loads((plan / "request.json").read_text())
    messages = request["input_data"]["input_string"][0]
    assert messages and messages[0]["role"] in ("user", "system")
    assert request["input_data"]["parameters"]["max_new_tokens"] > 0 and request["params"] == {}
    # named after the data it used (the offline sample), not the notebook's ultrachat
    assert "tiny-phi3-sample-bs8-cosine-nods-nolora-save_limit2-seqlen512" in (plan / "plan.yaml").read_text()


def test_a_step_refuses_to_run_without_what_an_earlier_step_makes(tmp_path):
    """The finetune step's precondition lives in the step (runner/steps/finetune.py), the same for every backend:
    the backend is never asked."""
    from runner.steps.finetune import MissingInput

    backend = RecordingBackend()
    with pytest.raises(MissingInput, match="needs the data step's files"):
        run(compose_cfg(["steps=[finetune]"]), run_dir=tmp_path, backend=backend)
    assert backend.calls == []
    assert load_record(tmp_path)["steps"]["finetune"]["status"] == "failed"


def test_step_results_are_typed_and_recorded_flat(tmp_path):
    from runner.steps.finetune import FinetuneResult

    run(compose_cfg(["steps=[data,finetune]"]), run_dir=tmp_path, backend=RecordingBackend())
    saved = load_record(tmp_path)
    result = FinetuneResult.from_record(saved, "finetune")
    assert result.eval_loss == 1.25 and result.details == {"step": "finetune"}
    assert saved["steps"]["finetune"]["outputs"] == {"step": "finetune", "eval_loss": 1.25}


def test_local_dry_run_shows_what_the_trainer_would_be_handed(tmp_path):
    """The local plan's training section comes from the finetune step's own translate (runner/local/translate.py)."""
    import yaml

    run(compose_cfg(["dry_run=true", "finetune.learning_rate=1e-3", "finetune=lora"]), run_dir=tmp_path,
        task_overrides=["finetune.learning_rate=1e-3"])
    plan = yaml.safe_load((tmp_path / "plan" / "plan.yaml").read_text())
    training = plan["finetune"]["training"]
    assert training["training_args"]["learning_rate"] == 1e-3
    assert training["lora"]["r"] == plan["finetune"]["params"]["lora_r"]
