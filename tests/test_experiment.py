"""Experiment YAML schema: defaults, resolution of paths, one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedseg.orchestration.experiment import (
    DEFAULT_APP,
    load_experiment,
    parse_experiment,
)
from fedseg_clinic.errors import FedsegError

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, doc: object) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_minimal_phantom_experiment_gets_defaults(tmp_path: Path) -> None:
    exp = load_experiment(_write(tmp_path, {"name": "t1", "data": {"phantoms": {}}}))
    assert exp.name == "t1"
    assert exp.seed == 0
    assert exp.data.clinic_names() == ["clinic-1", "clinic-2", "clinic-3"]
    assert exp.session.rounds == 5 and exp.session.aggregator == "fedavg"
    assert exp.session.validate is True
    assert exp.clients.route == "callback" and exp.clients.app == DEFAULT_APP
    assert exp.source == tmp_path / "exp.yaml"


def test_clinic_dirs_resolve_against_the_file_folder(tmp_path: Path) -> None:
    doc = {"name": "t2", "data": {"clinics": {"a": "cases/a", "b": "/abs/b"}}}
    exp = load_experiment(_write(tmp_path, doc))
    assert exp.data.clinic_dirs == {"a": tmp_path / "cases" / "a", "b": Path("/abs/b")}
    assert exp.data.clinic_names() == ["a", "b"]


def test_fedopt_kwargs_are_typed(tmp_path: Path) -> None:
    doc = {"name": "t3", "data": {"phantoms": {"clinics": 2}},
           "session": {"aggregator": "fedopt",
                       "aggregator_kwargs": {"serveropt": "yogi", "learning_rate": 1}}}
    exp = load_experiment(_write(tmp_path, doc))
    assert exp.session.aggregator_kwargs == {"serveropt": "yogi", "learning_rate": 1.0}
    assert isinstance(exp.session.aggregator_kwargs["learning_rate"], float)


def test_schedule_is_resolved_per_round() -> None:
    exp = parse_experiment({"name": "s", "data": {"phantoms": {"clinics": 1}},
                            "session": {"rounds": 3},
                            "client_settings": {"learning_rate": [0.1, 0.05, 0.01],
                                                "local_steps": 4}})
    assert exp.settings_for_round(1) == {"learning_rate": 0.1, "local_steps": 4}
    assert exp.settings_for_round(3) == {"learning_rate": 0.01, "local_steps": 4}


BAD = [
    ({"data": {"phantoms": {}}}, "name: must be"),
    ({"name": "x"}, "data: missing"),
    ({"name": "x", "data": {}}, "data: give exactly one"),
    ({"name": "x", "data": {"phantoms": {}, "clinics": {"a": "b"}}}, "data: give exactly one"),
    ({"name": "x", "data": {"phantoms": {"clinics": 0}}}, "data.phantoms.clinics: must be"),
    ({"name": "x", "data": {"phantoms": {}}, "sesion": {}}, "sesion: unknown key"),
    ({"name": "x", "data": {"phantoms": {}}, "session": {"rounds": 0}}, "session.rounds"),
    ({"name": "x", "data": {"phantoms": {}}, "session": {"rounds": True}}, "session.rounds"),
    ({"name": "x", "data": {"phantoms": {}}, "session": {"aggregator": "krum"}},
     "session.aggregator: must be one of fedavg, fedopt"),
    ({"name": "x", "data": {"phantoms": {}},
      "session": {"aggregator": "fedavg", "aggregator_kwargs": {"tau": 1}}},
     "session.aggregator_kwargs: fedavg takes no kwargs"),
    ({"name": "x", "data": {"phantoms": {}},
      "session": {"aggregator": "fedopt", "aggregator_kwargs": {"serveropt": "sgd"}}},
     "session.aggregator_kwargs.serveropt"),
    ({"name": "x", "data": {"phantoms": {}},
      "session": {"aggregator": "fedopt", "aggregator_kwargs": {"momentum": 0.9}}},
     "session.aggregator_kwargs.momentum: unknown fedopt kwarg"),
    ({"name": "x", "data": {"phantoms": {"clinics": 2}}, "session": {"min_clients": 3}},
     "session.min_clients: 3 is more than the 2 clinics"),
    ({"name": "x", "data": {"phantoms": {}}, "clients": {"route": "docker"}}, "clients.route"),
    ({"name": "x", "data": {"phantoms": {}}, "clients": {"app": "no_colon"}}, "clients.app"),
    ({"name": "x", "data": {"phantoms": {}}, "session": {"rounds": 2},
      "client_settings": {"learning_rate": [1, 2, 3]}},
     "client_settings.learning_rate: a schedule needs"),
    ({"name": "x", "data": {"phantoms": {}}, "client_settings": {"d": {"a": 1}}},
     "client_settings.d: must be a string"),
    ({"name": "bad name", "data": {"phantoms": {}}}, "name: must be"),
]


@pytest.mark.parametrize(("doc", "fragment"), BAD)
def test_bad_documents_name_file_and_key(tmp_path: Path, doc: dict, fragment: str) -> None:
    path = _write(tmp_path, doc)
    with pytest.raises(FedsegError) as info:
        load_experiment(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert fragment in message
    assert "\n" not in message


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(FedsegError, match="experiment file not found"):
        load_experiment(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(FedsegError, match=r"bad.yaml:\d+: not valid YAML"):
        load_experiment(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(FedsegError, match="must be a YAML mapping"):
        load_experiment(listy)


@pytest.mark.parametrize("path", sorted([*(REPO / "experiments").glob("*.yaml"),
                                         *(REPO / "experiments" / "studies").glob("*.yaml")]),
                         ids=lambda p: p.name)
def test_shipped_examples_are_valid(path: Path) -> None:
    exp = load_experiment(path)
    assert exp.name
    assert exp.session.rounds >= 1


@pytest.mark.parametrize(("extra", "fragment"), [
    ({"clinic": {"training": {"local_steps": 0}}}, "clinic: local_steps must be >= 1"),
    ({"clinic": {"trainig": {}}}, "clinic: unknown setting trainig"),
    ({"client_settings": {"lr": 0.1}}, "client_settings.lr: not a per-round clinic setting"),
    ({"client_settings": {"learning_rate": -1.0}}, "client_settings: round 1:"),
])
def test_clinic_settings_are_checked_for_the_default_app(extra: dict, fragment: str) -> None:
    doc = {"name": "x", "data": {"phantoms": {}}, **extra}
    with pytest.raises(FedsegError, match=fragment):
        parse_experiment(doc, "x.yaml")
    # A custom app has its own settings: not checked against ClinicSettings.
    parse_experiment({**doc, "clients": {"app": "toy_clinic_app:ToyApp.from_environment"}})


def test_validation_timeout_defaults_to_120_s_and_is_checked(tmp_path: Path) -> None:
    base = {"name": "vt", "data": {"phantoms": {"clinics": 1}}}
    assert parse_experiment(base).session.validation_timeout == 120
    exp = parse_experiment({**base, "session": {"validation_timeout": 900}})
    assert exp.session.validation_timeout == 900
    with pytest.raises(FedsegError, match=r"session\.validation_timeout"):
        load_experiment(_write(tmp_path, {**base, "session": {"validation_timeout": 0}}))


def test_the_openkbp_study_experiment_loads() -> None:
    exp = load_experiment(REPO / "experiments" / "studies" / "openkbp-fedavg.yaml")
    assert exp.model["organ_set"] == "head_neck"
    assert exp.data.clinic_names() == ["clinic-a", "clinic-b", "clinic-c", "clinic-d"]
    assert exp.session.validate is False
