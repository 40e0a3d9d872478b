"""Client processes: argument handling, environment, callback adapter, start failures."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import fedseg_cli

from fedseg.orchestration import clients as clients_mod
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.fedn_callback import (
    TOKEN_ENV,
    CallbackAdapter,
    new_client_id,
    normalise_api_url,
    resolve_factory,
)

TESTS = Path(__file__).resolve().parent
TOY_APP = "toy_clinic_app:ToyApp.from_environment"


def test_each_client_start_gets_a_fresh_id() -> None:
    ids = {new_client_id() for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == 36 for i in ids)


@pytest.mark.parametrize(("raw", "expected"), [
    ("http://127.0.0.1:8092", "http://127.0.0.1:8092/"),
    ("http://127.0.0.1:8092/", "http://127.0.0.1:8092/"),
    ("127.0.0.1:8092", "http://127.0.0.1:8092/"),
])
def test_api_url_gets_scheme_and_trailing_slash(raw: str, expected: str) -> None:
    assert normalise_api_url(raw) == expected


@pytest.mark.parametrize(("spec", "fragment"), [
    ("no_colon", "expected MODULE:FACTORY"),
    ("surely_not_a_module_xyz:f", "cannot import"),
    ("toy_clinic_app:Nope", "has no Nope"),
    ("toy_clinic_app:N_FEATURES", "not callable"),
])
def test_bad_app_specs(spec: str, fragment: str) -> None:
    with pytest.raises(FedsegError, match=fragment):
        resolve_factory(spec)


def test_dotted_factory_resolves() -> None:
    import toy_clinic_app

    assert resolve_factory(TOY_APP) == toy_clinic_app.ToyApp.from_environment


def _npz(weights: list[np.ndarray]) -> io.BytesIO:
    from fedn.utils.helpers.helpers import get_helper

    buffer = io.BytesIO()
    get_helper("numpyhelper").save(weights, buffer)
    buffer.seek(0, io.SEEK_END)  # fedn hands the buffer over at its end
    return buffer


def test_callback_adapter_round_trip() -> None:
    from fedn.utils.helpers.helpers import get_helper
    from toy_clinic_app import ToyApp

    adapter = CallbackAdapter(ToyApp("clinic-a"))
    out, meta = adapter.train(_npz([np.zeros(4)]), {"learning_rate": 0.1, "local_steps": 2})
    weights = get_helper("numpyhelper").load(out)
    assert weights[0].shape == (4,) and np.any(weights[0] != 0)
    tm = meta["training_metadata"]
    assert tm["num_examples"] == 40 and tm["local_steps"] == 2 and tm["learning_rate"] == 0.1
    metrics = adapter.validate(_npz(weights))
    assert set(metrics) == {"val_loss", "val_dice_mean", "val_dice_heart", "n_val"}
    assert np.isnan(metrics["val_dice_heart"])


class _NoCount:
    def train(self, weights: list[np.ndarray], settings: dict) -> tuple[list, dict]:
        return weights, {"train_loss": np.float32(1.0)}

    def validate(self, weights: list[np.ndarray]) -> dict:
        return {"bad": [1, 2]}


def test_adapter_rejects_metadata_fedn_cannot_use() -> None:
    adapter = CallbackAdapter(_NoCount())
    with pytest.raises(FedsegError, match="num_examples"):
        adapter.train(_npz([np.zeros(2)]), {})
    with pytest.raises(FedsegError, match="bad"):
        adapter.validate(_npz([np.zeros(2)]))


def test_client_env_sets_clinic_vars_and_drops_server_secrets(tmp_path: Path) -> None:
    spec = clients_mod.ClientSpec("c1", tmp_path / "data", tmp_path / "s.yaml", {"X": "1"})
    base = {"PATH": "/usr/bin", "FEDN_JWT_SECRET_KEY": "s", "STATESTORE_CONFIG": "f",
            "FEDSEG_SETTINGS": "/old", TOKEN_ENV: "old"}
    env = clients_mod.client_env(spec, tmp_path / "c1", None, base)
    assert env["FEDSEG_DATA_DIR"] == str(tmp_path / "data")
    assert env["FEDSEG_STATE_DIR"] == str(tmp_path / "c1" / "state")
    assert env["FEDSEG_SETTINGS"] == str(tmp_path / "s.yaml")
    assert env["FEDSEG_CLIENT_NAME"] == "c1" and env["X"] == "1"
    assert "FEDN_JWT_SECRET_KEY" not in env and "STATESTORE_CONFIG" not in env
    assert TOKEN_ENV not in env
    assert env["PATH"].endswith("/usr/bin")
    with_token = clients_mod.client_env(spec, tmp_path / "c1", "tok", base)
    assert with_token[TOKEN_ENV] == "tok"


def test_client_argv_for_both_routes(tmp_path: Path) -> None:
    spec = clients_mod.ClientSpec("c1", tmp_path)
    cb = clients_mod.client_argv("callback", spec, "http://127.0.0.1:8092/", TOY_APP,
                                 tmp_path, "tok")
    assert cb[1:3] == ["-m", "fedseg_clinic.fedn_callback"]
    assert len(cb[cb.index("--client-id") + 1]) == 36
    assert "tok" not in cb  # the token travels in the environment, not in ps output
    pkg = clients_mod.client_argv("package", spec, "http://127.0.0.1:8092/", TOY_APP,
                                  tmp_path, "tok", combiner="combiner-1", client_id="id-1")
    assert pkg[1:4] == ["-m", "fedseg.orchestration.fedn.launch", "client"]
    assert pkg[pkg.index("--init") + 1] == str(tmp_path / "fedn-client.yaml")
    assert "tok" not in pkg  # not on the command line
    path = clients_mod.write_package_config(tmp_path, spec, "http://127.0.0.1:8092/", "tok",
                                            "combiner-1", "id-1")
    assert path.stat().st_mode & 0o777 == 0o600
    import yaml

    assert yaml.safe_load(path.read_text()) == {
        "api_url": "http://127.0.0.1", "api_port": 8092, "name": "c1", "client_id": "id-1",
        "token": "tok", "preferred_combiner": "combiner-1"}
    with pytest.raises(FedsegError, match="route"):
        clients_mod.client_argv("docker", spec, "http://x/", TOY_APP, tmp_path, None)


def test_missing_data_folder_is_refused_before_any_process(tmp_path: Path) -> None:
    spec = clients_mod.ClientSpec("c1", tmp_path / "nope")
    with pytest.raises(FedsegError, match="nope: data folder of client c1"):
        clients_mod.clients_up(tmp_path, [spec], api_url="http://127.0.0.1:1/", app=TOY_APP)
    assert clients_mod.load_clients(tmp_path) == []


def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    spec = clients_mod.ClientSpec("c1", tmp_path)
    with pytest.raises(FedsegError, match="unique"):
        clients_mod.clients_up(tmp_path, [spec, spec], api_url="http://x/", app=TOY_APP)


@pytest.mark.slow
def test_app_start_failure_is_reported_with_log_and_nothing_left(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "TOY_FAIL_AT_START": "1"}
    specs = [clients_mod.ClientSpec("c1", data, env=env)]
    with pytest.raises(FedsegError) as info:
        clients_mod.clients_up(tmp_path, specs, api_url="http://127.0.0.1:9/", app=TOY_APP,
                               ready_timeout_s=60)
    message = str(info.value)
    assert "client c1 exited while starting" in message
    assert "asked to fail at start" in message
    assert clients_mod.load_clients(tmp_path) == []
    assert clients_mod.client_status(tmp_path) == []



def test_cli_bad_input_is_one_line(tmp_path: Path) -> None:
    code, out = _code_output(["clients", "up", "--network", str(tmp_path), "--clinic", "a=b"])
    assert code == 1 and "no network state" in out and len(out.strip().splitlines()) == 1
    code, out = _code_output(["run", str(tmp_path / "missing.yaml")])
    assert code == 1 and "experiment file not found" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {phantoms: {}}\nsession: {rounds: 0}\n")
    code, out = _code_output(["run", str(bad)])
    assert code == 1 and "session.rounds" in out and len(out.strip().splitlines()) == 1


def test_cli_clients_down_and_status_with_nothing_recorded(tmp_path: Path) -> None:
    assert _code_output(["clients", "down", "--root", str(tmp_path)]) == (
        0, "stopped nothing (none running)\n")
    assert _code_output(["clients", "status", "--root", str(tmp_path)]) == (
        0, "no clients recorded\n")


def test_adapter_keeps_updates_only_when_asked(tmp_path: Path) -> None:
    from fedn.utils.helpers.helpers import get_helper
    from toy_clinic_app import ToyApp

    from fedseg_clinic.fedn_callback import keep_updates_dir

    assert keep_updates_dir({"FEDSEG_STATE_DIR": str(tmp_path)}) is None
    folder = keep_updates_dir({"FEDSEG_KEEP_UPDATES": "1", "FEDSEG_STATE_DIR": str(tmp_path)})
    assert folder == tmp_path / "updates"
    with pytest.raises(FedsegError, match="FEDSEG_STATE_DIR"):
        keep_updates_dir({"FEDSEG_KEEP_UPDATES": "true"})
    adapter = CallbackAdapter(ToyApp("clinic-a"), keep_updates=folder)
    for _ in range(2):
        out, _meta = adapter.train(_npz([np.zeros(4)]), {"learning_rate": 0.1})
    kept = get_helper("numpyhelper").load(folder / "update-2.npz")
    np.testing.assert_array_equal(kept[0], get_helper("numpyhelper").load(out)[0])
    record = json.loads((folder / "update-1.json").read_text())
    assert record["call"] == 1 and record["server_settings"] == {"learning_rate": 0.1}
    assert record["training_metadata"]["num_examples"] == 40
    assert sorted(p.name for p in folder.iterdir()) == [
        "update-1.json", "update-1.npz", "update-2.json", "update-2.npz"]


def test_cli_clients_status_lists_each_client_with_its_fedn_id(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    spec = clients_mod.ClientSpec("c1", data, env={"PYTHONPATH": str(TESTS)})
    # Nothing listens on port 9: the client keeps retrying the API, i.e. stays alive.
    handle = clients_mod.start_client(tmp_path, spec, api_url="http://127.0.0.1:9/",
                                      app=TOY_APP)
    try:
        assert clients_mod.load_clients(tmp_path)[0].client_id == handle.client_id
        code, out = _code_output(["clients", "status", "--root", str(tmp_path)])
        assert code == 0 and out.startswith("c1 ") and f"id {handle.client_id}" in out
        assert " alive " in out
    finally:
        clients_mod.stop_clients(tmp_path)
    assert _code_output(["clients", "status", "--root", str(tmp_path)]) == (
        0, "no clients recorded\n")


def _code_output(args: list[str]) -> tuple[int, str]:
    result = fedseg_cli(args)
    return result.exit_code, result.output
