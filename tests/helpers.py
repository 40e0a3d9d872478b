"""Helpers shared by several test modules (tests/ is on sys.path: ``from helpers import``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from fedseg.orchestration.runlog import RoundRecord, write_rounds, write_run_info


def fedseg_cli(args: list[str]) -> Result:
    """Run the ``fedseg`` command in this process; exit code and output in the result."""
    from fedseg.cli import cli

    return CliRunner().invoke(cli, args)


def make_run(path: Path, rows: list[tuple[int, str, str, float]], kind: str = "federated",
             **info: Any) -> Path:
    """A run folder with the given round-log rows and a run.json (``info`` overrides).

    Args:
        path: the run folder to create (must not exist).
        rows: (round, client, metric, value) tuples.
        kind: federated, pooled or local.
        **info: run.json keys to set or override (seed, config, ...).

    Returns:
        ``path``.
    """
    path.mkdir(parents=True)
    write_rounds(path, [RoundRecord(*row) for row in rows])
    write_run_info(path, {"name": path.name, "seed": 1, "kind": kind,
                          "config": {"aggregator": "fedavg"}, "versions": {}, "timings": {},
                          **info})
    return path
