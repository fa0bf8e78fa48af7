"""The endpoint server's settings: one typed object, written by the manager as one file and read back by the server,
which refuses a file it cannot run with by naming the key; the server's command line is that file's path only."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from runner.local.endpoint import manager
from runner.local.endpoint.limits import RequestLimits
from runner.local.endpoint.settings import EndpointSettings, SettingsError
from tests.conftest import REPO, compose_cfg

KEY = "the-secret-key-0123456789"


def full_settings(tmp_path: Path) -> EndpointSettings:
    """Every field away from its default, so a field the file loses or mistypes shows in the comparison."""
    key_file = tmp_path / "ep.key"
    key_file.write_text(KEY + "\n")
    return EndpointSettings(
        name="settings-ep", deployments={"blue": "models:/m/1", "green": str(tmp_path / "model")},
        traffic={"blue": 70, "green": 30}, key=KEY, key_file=str(key_file), host="::1", port=8123,
        port_file=str(tmp_path / "ep.port"), owner_pid=4242, state_file=str(tmp_path / "ep.json"), log_level="debug",
        request_timeout_ms=1234, max_batch_size=3, batch_window_ms=2.5, seed=7, shutdown_grace_s=4.0,
        torch_threads=2, device="cuda", load_delay_s=0.5, max_request_bytes=2048,
        limits=RequestLimits(max_messages=9, max_prompt_chars=999, max_prompt_tokens=77, max_stop_strings=2,
                             max_stop_chars=33),
        header_timeout_s=1.5, body_timeout_s=2.5, keep_alive_timeout_s=3.5, max_connections=12)


def written(tmp_path: Path, **changes) -> Path:
    """A settings file as the manager writes it, with `changes` applied to its JSON (None removes a key)."""
    data = full_settings(tmp_path).to_json()
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            data[outer][inner] = value
        elif value is None:
            data.pop(key)
        else:
            data[key] = value
    path = tmp_path / "settings-ep.settings.json"
    path.write_text(json.dumps(data))
    return path


def test_settings_round_trip_through_their_file_without_the_key(tmp_path):
    settings = full_settings(tmp_path)
    path = settings.write(tmp_path / "settings-ep.settings.json")
    assert KEY not in path.read_text()  # the key stays in its own 0600 file
    assert "key" not in json.loads(path.read_text())
    loaded = EndpointSettings.from_file(path)
    assert loaded == settings
    assert loaded.key == KEY  # read once from key_file
    assert isinstance(loaded.limits, RequestLimits) and isinstance(loaded.batch_window_ms, float)
    assert KEY not in repr(loaded)


@pytest.mark.parametrize("key, value, named", [
    ("max_batch_sizes", 4, "max_batch_sizes"),  # a typo
    ("limits.max_messagess", 4, "limits.max_messagess"),
    ("key", KEY, "'key' must not be in a settings file"),
])
def test_an_unknown_key_is_refused_by_name(tmp_path, key, value, named):
    with pytest.raises(SettingsError, match="unknown key|must not be") as err:
        EndpointSettings.from_file(written(tmp_path, **{key: value}))
    assert named in str(err.value)


@pytest.mark.parametrize("key, value", [
    ("port", "8123"), ("max_batch_size", True), ("batch_window_ms", "fast"), ("deployments", ["blue"]),
    ("traffic", {"blue": "70"}), ("owner_pid", 4.5), ("limits", [1]), ("limits.max_messages", "9"),
    ("header_timeout_s", math.nan), ("name", 5),
])
def test_a_wrong_type_is_refused_by_name(tmp_path, key, value):
    with pytest.raises(SettingsError) as err:
        EndpointSettings.from_file(written(tmp_path, **{key: value}))
    assert key.split(".")[0] in str(err.value) and "settings-ep.settings.json" in str(err.value)


@pytest.mark.parametrize("key, value, message", [
    ("max_connections", 0, "deployment.max_connections must be > 0"), ("device", "tpu", "device must be one of"),
    ("port", 70000, "port must be 0..65535"), ("limits.max_messages", 0, "deployment.max_messages must be"),
])
def test_a_value_out_of_range_is_refused_by_name(tmp_path, key, value, message):
    with pytest.raises(SettingsError, match=message):
        EndpointSettings.from_file(written(tmp_path, **{key: value}))


@pytest.mark.parametrize("key", ["name", "deployments", "traffic", "key_file"])
def test_a_missing_required_key_is_refused_by_name(tmp_path, key):
    with pytest.raises(SettingsError, match=f"missing required key.*'{key}'"):
        EndpointSettings.from_file(written(tmp_path, **{key: None}))


def test_an_empty_key_file_or_a_broken_file_is_one_clear_error(tmp_path):
    path = written(tmp_path)
    Path(json.loads(path.read_text())["key_file"]).write_text("\n")
    with pytest.raises(SettingsError, match="is empty"):
        EndpointSettings.from_file(path)
    path.write_text('{"name": ')
    with pytest.raises(SettingsError, match="cannot be read as JSON"):
        EndpointSettings.from_file(path)


def test_the_server_process_says_what_is_wrong_in_one_line(tmp_path):
    path = written(tmp_path, max_batch_size="16")
    done = subprocess.run([sys.executable, "-m", manager.SERVER_MODULE, "--settings", str(path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "max_batch_size must be int" in done.stderr and "Traceback" not in done.stderr


def test_settings_from_the_deployment_config_take_every_key_of_the_same_name(tmp_path):
    cfg = compose_cfg(["deployment.max_batch_size=5", "deployment.header_timeout_s=2.5", "deployment.max_messages=11",
                   "deployment.device=cpu", "deployment.port=8999"])
    settings = EndpointSettings.from_deployment(cfg.deployment, name="from-config", deployments={"demo": "m"})
    assert (settings.max_batch_size, settings.header_timeout_s, settings.device, settings.port) == (5, 2.5, "cpu", 8999)
    assert settings.limits.max_messages == 11 and settings.traffic == {"demo": 100}
    assert settings.request_timeout_ms == cfg.deployment.request_timeout_ms
    assert settings.max_request_bytes == cfg.deployment.max_request_bytes


def test_the_server_command_line_is_the_settings_path_only(tmp_path):
    """No secret and no setting in `ps`: the command line names the settings file, and the manager still knows its
    server by it (and by the instance token in its environment)."""
    settings = EndpointSettings(name="cmdline-ep", deployments={"demo": str(tmp_path / "never-loaded")},
                                traffic={"demo": 100}, load_delay_s=60)  # bound at once, never loads a model
    state = manager.launch_server(settings, state_dir=tmp_path)
    try:
        key = manager.read_key(state)
        cmdline = Path(f"/proc/{state['pid']}/cmdline").read_bytes().decode().split("\0")[:-1]
        settings_file = tmp_path / f"cmdline-ep{manager.SETTINGS_SUFFIX}"
        assert cmdline[1:] == ["-m", manager.SERVER_MODULE, "--settings", str(settings_file)]
        assert key not in " ".join(cmdline)
        on_disk = EndpointSettings.from_file(settings_file)
        assert on_disk.key == key and key not in settings_file.read_text()
        assert on_disk.owner_pid is not None and on_disk.port_file and on_disk.state_file  # the manager's own files
        child = manager._children.pop(state["pid"])  # seen as another process sees it: by /proc only
        try:
            assert manager._is_our_server(state["pid"], "cmdline-ep", state["instance"])
            assert not manager._is_our_server(state["pid"], "cmdline", state["instance"])  # a prefix is not it
            assert not manager._is_our_server(state["pid"], "cmdline-ep", "0" * 32)
        finally:
            manager._children[state["pid"]] = child
    finally:
        manager.stop_endpoint(state, state_dir=tmp_path)
    assert not settings_file.exists() and not (tmp_path / "cmdline-ep.key").exists()


def test_start_endpoint_refuses_settings_out_of_range_before_any_file_or_process(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    settings = EndpointSettings(name="bad-settings", deployments={"demo": str(model)}, traffic={"demo": 100},
                                max_connections=0)
    with pytest.raises(manager.EndpointError, match="deployment.max_connections must be > 0"):
        manager.start_endpoint(settings, state_dir=tmp_path / "endpoints")
    assert not (tmp_path / "endpoints").exists()
