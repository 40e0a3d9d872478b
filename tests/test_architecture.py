"""The layout's rules (docs/architecture.md), checked on the source.

- The compute package (what a clinic runs) imports nothing from the operator side
  (``fedseg``), and only the standard library, itself and what its python_env.yaml
  installs (with their own dependencies).
- python_env.yaml pins every package exactly as setup.cfg does.
"""

from __future__ import annotations

import ast
import configparser
import re
import sys
from importlib import metadata
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "compute_package"


def _imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in a file (function-level imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _package_imports() -> dict[Path, set[str]]:
    return {path: _imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _python_env_pins() -> dict[str, str]:
    env = yaml.safe_load((PACKAGE / "python_env.yaml").read_text())
    return {_canonical(d.split("==")[0]): d.split("==")[1] for d in env["dependencies"]}


def _dependency_closure(roots: set[str]) -> set[str]:
    """Distributions installed by pip for ``roots`` (required extras ignored)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for requirement in requires:
            if "extra ==" in requirement:
                continue
            todo.append(_canonical(re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0]))
    return seen


def test_the_compute_package_imports_nothing_from_the_operator_side() -> None:
    offenders = {str(path.relative_to(ROOT)): sorted(n for n in names
                                                     if n == "fedseg" or n.startswith("fedseg."))
                 for path, names in _package_imports().items()}
    assert {k: v for k, v in offenders.items() if v} == {}
    # The scan sees imports at all (a broken scan would pass the check above).
    assert "fedseg_clinic.errors" in _imports(PACKAGE / "fedseg_clinic" / "app.py")


def test_the_compute_package_imports_only_what_its_environment_installs() -> None:
    allowed = _dependency_closure(set(_python_env_pins()))
    distributions = metadata.packages_distributions()
    unknown: dict[str, list[str]] = {}
    for path, names in _package_imports().items():
        for name in names:
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top == "fedseg_clinic":
                continue
            owners = {_canonical(d) for d in distributions.get(top, [])}
            if not owners & allowed:
                unknown.setdefault(str(path.relative_to(ROOT)), []).append(name)
    assert unknown == {}


def test_python_env_pins_match_setup_cfg() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    setup_pins = {}
    for line in config["options"]["install_requires"].strip().splitlines():
        name, version = line.strip().split("==")
        setup_pins[_canonical(name.split("[")[0])] = version
    env_pins = _python_env_pins()
    assert env_pins, "python_env.yaml lists no dependencies"
    assert {name: setup_pins.get(name) for name in env_pins} == env_pins
