"""The registry's live component against the pinned contract: a changed default is reported (this run would send
the old default over it), and a live component that cannot be read is said, not silently replaced by the contract."""

import yaml

from runner.azureml.backend import AzureMLBackend
from runner.azureml.spec import compare_specs, load_spec
from runner.workflow import run
from tests.azureml.double import PIPELINE_SPEC, AzureWorld
from tests.conftest import compose_cfg
from tests.azureml.test_backend import TIMESTAMP, WS_IDS

STEPS = "steps=[connect,model,compute,data,finetune]"


def _live_component(tmp_path, **defaults):
    """The registry's component with some inputs' defaults changed."""
    from azure.ai.ml import load_component

    raw = yaml.safe_load(PIPELINE_SPEC.read_text())
    for name, value in defaults.items():
        raw["inputs"][name]["default"] = value
    path = tmp_path / "live.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_component(source=str(path)), path


def _run(tmp_path, world):
    overrides = ["experiment=phi4_ultrachat", "dataset=sample", STEPS, f"backend.config_path={tmp_path / 'none.json'}",
                 *WS_IDS]
    cfg = compose_cfg(overrides)
    return run(cfg, run_dir=tmp_path / "run", task_overrides=overrides,
               backend=AzureMLBackend(cfg, clients=world.clients(), clock=lambda: TIMESTAMP))


def test_compare_specs_reports_changed_defaults(tmp_path):
    _, path = _live_component(tmp_path, adam_beta1=0.95, warmup_steps=0)
    diff = compare_specs(load_spec(str(PIPELINE_SPEC)), load_spec(str(path)))
    assert diff.redefaulted == {"adam_beta1": {"pinned": 0.9, "live": 0.95}}  # 0 == 0: unchanged
    assert "defaults changed in" in diff.lines()[-1] and "adam_beta1: 0.9 -> 0.95" in diff.lines()[-1]


def test_a_run_that_sends_an_old_default_over_a_new_one_says_so_and_records_it(tmp_path, capsys):
    world = AzureWorld()
    world.model_body = world.registry_bodies["Phi-4"]
    world.component, _ = _live_component(tmp_path, adam_beta1=0.95)
    record = _run(tmp_path, world)
    overridden = record.output("finetune", "component_defaults_overridden")
    assert len(overridden) == 1 and overridden[0].startswith("adam_beta1: sending 0.9")
    assert overridden[0].endswith("defaults to 0.95")
    change = record.output("finetune", "component_diff")["redefaulted"]
    assert list(change) == ["adam_beta1"]  # every other input's default is the contract's
    assert (float(change["adam_beta1"]["pinned"]), float(change["adam_beta1"]["live"])) == (0.9, 0.95)
    assert "warning: component default changed: adam_beta1: sending 0.9" in capsys.readouterr().out


def test_an_unreadable_live_component_is_said_and_recorded(tmp_path, capsys):
    world = AzureWorld()
    world.model_body = world.registry_bodies["Phi-4"]

    def broken():
        raise ValueError("unexpected componentSpec shape")

    world.component._to_dict = broken
    record = _run(tmp_path, world)
    unread = record.output("finetune", "component_unread")
    assert unread.startswith("the registry's component chat_completion_pipeline could not be read (ValueError: "
                             "unexpected componentSpec shape); checked against the pinned contract")
    assert f"warning: {unread}" in capsys.readouterr().out
