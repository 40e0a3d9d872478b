"""session.py pieces that need no network: the settings hook source, packing."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from fedseg.orchestration.experiment import SessionSpec
from fedseg.orchestration.session import build_package, server_functions_source, session_timeout
from fedseg_clinic.errors import FedsegError


def _instantiate(source: str) -> object:
    """Do what fedn's hooks process does with the code: exec, then ServerFunctions()."""
    namespace: dict = {}
    exec(compile(source, "server_functions", "exec"), namespace)
    return namespace["ServerFunctions"]()


def test_hook_hands_out_each_rounds_settings_then_keeps_the_last() -> None:
    table = [{"learning_rate": 0.1, "local_steps": 2}, {"learning_rate": 0.05, "local_steps": 2}]
    functions = _instantiate(server_functions_source(table, "n1"))
    got = [functions.client_settings(global_model=[]) for _ in range(3)]
    assert got == [table[0], table[1], table[1]]


def test_hook_source_differs_per_session_so_fedn_rebuilds_it() -> None:
    table = [{"dp": True}]
    assert server_functions_source(table, "a") != server_functions_source(table, "b")
    with pytest.raises(ValueError):
        server_functions_source([], "a")


def test_build_package_honours_fednignore(tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    import logging

    src = tmp_path / "pkg"
    (src / "sub").mkdir(parents=True)
    (src / "fedn.yaml").write_text("entry_points: {}\n")
    (src / "sub" / "keep.py").write_text("x = 1\n")
    (src / "sub" / "drop.pyc").write_bytes(b"\0")
    (src / ".fednignore").write_text("*.pyc\n")
    level = logging.getLogger("fedn").level
    with caplog.at_level(logging.DEBUG):
        out = build_package(src, tmp_path / "out" / "package.tgz")
    # fedn logs every packed file at DEBUG: kept out of a run's output, level restored.
    assert not [r for r in caplog.records if "Adding file" in r.getMessage()]
    assert logging.getLogger("fedn").level == level
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
    assert {"fedn.yaml", "sub/keep.py"} <= names and "sub/drop.pyc" not in names
    assert [p.name for p in out.parent.iterdir()] == ["package.tgz"]


def test_build_package_needs_fedn_yaml(tmp_path: Path) -> None:
    with pytest.raises(FedsegError, match=r"no fedn\.yaml"):
        build_package(tmp_path, tmp_path / "package.tgz")


def test_session_timeout_covers_every_round_timeout() -> None:
    assert session_timeout(SessionSpec(rounds=3, round_timeout=10)) >= 3 * 10
