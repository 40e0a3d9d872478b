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


def tiny_real_experiment(name: str, **client_env: str) -> dict[str, Any]:
    """The smallest experiment of the real clinic app through FEDn, as an experiment dict.

    Two non-iid phantom clinics of 3 patients (size 32), a 2-level U-Net, 2 DP rounds of 2
    local steps; clients single-threaded. ``client_env`` adds client environment variables.
    """
    return {
        "name": name, "seed": 5,
        "data": {"phantoms": {"preset": "non-iid", "clinics": 2,
                              "options": {"patients": 3, "size": 32}}},
        "model": {"levels": 2, "base_filters": 4, "groups": 2},
        "clinic": {
            "training": {"learning_rate": 0.003, "local_steps": 2, "batch_size": 2,
                         "patch_size": [16, 16, 16]},
            "privacy": {"enabled": True, "noise_multiplier": 1.0, "l2_norm_clip": 1.0},
            "validation": {"patch_size": [16, 16, 16], "overlap": 0.0, "batch_size": 4},
        },
        "session": {"rounds": 2, "round_timeout": 300, "min_clients": 2},
        "clients": {"env": {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
                            "TF_CPP_MIN_LOG_LEVEL": "2", **client_env}},
    }


def read_until(proc: Any, prefix: str, output: list[str], timeout_s: float) -> None:
    """Read a child's output lines into ``output`` until one starts with ``prefix``.

    Fails the test when the child ends first or the deadline passes.
    """
    import time

    import pytest

    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    for line in proc.stdout:
        output.append(line)
        if line.startswith(prefix):
            return
        assert time.monotonic() < deadline, "".join(output)
    pytest.fail(f"run ended before {prefix!r}:\n" + "".join(output))


def run_process_records(run_dir: Path) -> list[dict[str, Any]]:
    """The process records a run left: its network's and its clients'."""
    import json

    from fedseg.orchestration import clients

    state = json.loads((run_dir / "network" / "network.json").read_text())
    records = list(state["records"].values())
    return records + [h.record.to_dict() for h in clients.load_clients(run_dir)]


def start_fedseg_run(experiment: Path, runs: Path, pythonpath: str | None = None) -> Any:
    """``fedseg run EXPERIMENT --runs-dir RUNS`` as a child process (text stdout+stderr).

    Args:
        experiment: the experiment file.
        runs: the runs folder.
        pythonpath: PYTHONPATH for the run (the toy clinic app's folder), else inherited.
    """
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    fedseg = Path(sys.executable).parent / "fedseg"
    # SIGINT back to its default before exec, so Ctrl-C tests behave as from a terminal:
    # a suite started in the background by a non-interactive shell inherits SIGINT
    # ignored, and Python then never raises KeyboardInterrupt (POSIX background jobs).
    default_sigint = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                      "os.execv(sys.argv[1], sys.argv[1:])")
    return subprocess.Popen([sys.executable, "-c", default_sigint, str(fedseg), "run",
                             str(experiment), "--runs-dir", str(runs)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=experiment.parent)
