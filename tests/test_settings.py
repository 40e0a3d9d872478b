from __future__ import annotations

from pathlib import Path

import pytest

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.settings import load_settings, with_server_overrides


def test_load_settings_from_file_and_env(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("training:\n  local_steps: 3\n  patch_size: 16\nprivacy:\n  delta: 1.0e-4\n"
                    "model:\n  levels: 2\n")
    settings = load_settings({"FEDSEG_SETTINGS": str(path), "FEDSEG_DATA_DIR": str(tmp_path)})
    assert settings.training.local_steps == 3
    assert settings.training.patch_size == (16, 16, 16)
    assert settings.privacy.delta == 1e-4
    assert settings.model == {"levels": 2}
    assert settings.data_dir == tmp_path
    assert settings.state_dir == tmp_path / ".fedseg"


@pytest.mark.parametrize(
    ("text", "message"),
    [("training:\n  learning_rate: -1\n", "learning_rate must be > 0"),
     ("privacy:\n  noise_multiplier: -0.5\n", "noise_multiplier must be >= 0"),
     ("training:\n  bogus: 1\n", "unknown setting training.bogus"),
     ("training:\n  local_steps: 2.5\n", "wrong type"),
     ("- a list\n", "must be a mapping")],
)
def test_bad_settings_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    with pytest.raises(FedsegError, match=message) as info:
        load_settings({"FEDSEG_SETTINGS": str(path), "FEDSEG_DATA_DIR": str(tmp_path)})
    assert str(path) in str(info.value)


def test_missing_data_dir_and_settings_file(tmp_path: Path) -> None:
    with pytest.raises(FedsegError, match="does not exist"):
        load_settings({"FEDSEG_SETTINGS": str(tmp_path / "none.yaml")})
    path = tmp_path / "s.yaml"
    path.write_text("{}\n")
    with pytest.raises(FedsegError, match="no data folder"):
        load_settings({"FEDSEG_SETTINGS": str(path)})


def test_server_overrides(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("{}\n")
    base = load_settings({"FEDSEG_SETTINGS": str(path), "FEDSEG_DATA_DIR": str(tmp_path)})
    merged = with_server_overrides(base, {"learning_rate": "0.01", "dp": "False",
                                          "local_steps": 4, "fedn_internal": "x"})
    assert merged.training.learning_rate == 0.01
    assert merged.privacy.enabled is False
    assert base.privacy.enabled is True  # the clinic's own settings are not mutated
    with pytest.raises(FedsegError, match="batch_size must be >= 1"):
        with_server_overrides(base, {"batch_size": 0})


@pytest.mark.parametrize(("value", "ok"), [([-1000, 1000], True), ([500, -500], False),
                                          ([1, 2, 3], False)])
def test_hu_window(tmp_path: Path, value: list[int], ok: bool) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(f"training:\n  hu_window: {value}\n")
    env = {"FEDSEG_SETTINGS": str(path), "FEDSEG_DATA_DIR": str(tmp_path)}
    if ok:
        assert load_settings(env).training.hu_window == (-1000.0, 1000.0)
    else:
        with pytest.raises(FedsegError, match="hu_window"):
            load_settings(env)


@pytest.mark.parametrize(("privacy", "training", "message"), [
    ("target_epsilon: 8", "{}", "needs planned_rounds"),
    ("{target_epsilon: -1, planned_rounds: 3}", "{}", "target_epsilon"),
    ("{planned_rounds: 0}", "{}", "planned_rounds"),
    ("{}", "{trainable: weights}", "trainable must be one of"),
    ("{}", "{augmentations_per_patient: 0}", "augmentations_per_patient"),
    ("{dp_optimizer: opacus}", "{}", "dp_optimizer must be fedseg or tf_privacy"),
    ("{}", "{ema_decay: 1.0}", "ema_decay must be in"),
])
def test_dp_recipe_settings_are_checked(tmp_path: Path, privacy: str, training: str,
                                        message: str) -> None:
    if not privacy.startswith("{"):
        privacy = "{" + privacy + "}"
    path = tmp_path / "s.yaml"
    path.write_text(f"data_dir: {tmp_path}\nprivacy: {privacy}\ntraining: {training}\n")
    with pytest.raises(FedsegError, match=message):
        load_settings({"FEDSEG_SETTINGS": str(path)})


def test_dp_recipe_settings_from_file_and_server(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(f"data_dir: {tmp_path}\nprivacy: {{target_epsilon: 8, planned_rounds: 3}}\n"
                    "training: {trainable: norm_bias, augmentations_per_patient: 2}\n")
    settings = load_settings({"FEDSEG_SETTINGS": str(path)})
    assert settings.privacy.target_epsilon == 8.0 and settings.privacy.planned_rounds == 3
    assert settings.training.trainable == "norm_bias"
    merged = with_server_overrides(settings, {"trainable": "head", "planned_rounds": "5"})
    assert merged.training.trainable == "head" and merged.privacy.planned_rounds == 5


def test_local_epochs_resolve_to_steps_per_clinic_size(tmp_path: Path) -> None:
    from fedseg_clinic.settings import settings_from_mapping, with_local_steps

    settings = settings_from_mapping({"training": {"batch_size": 4, "local_steps": 10,
                                                   "local_epochs": 1.5}}, "test")
    # ceil(1.5 * N / 4): unbalanced clinics each see their data 1.5 times per round.
    assert with_local_steps(settings, 40).training.local_steps == 15
    assert with_local_steps(settings, 9).training.local_steps == 4
    assert with_local_steps(settings, 1).training.local_steps == 1
    off = settings_from_mapping({"training": {"local_steps": 10}}, "test")
    assert with_local_steps(off, 40).training.local_steps == 10
    with pytest.raises(FedsegError, match="local_epochs must be a finite number >= 0"):
        settings_from_mapping({"training": {"local_epochs": -1}}, "test")
