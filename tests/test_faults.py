"""Fault injection with real processes: the API server or the S3 endpoint killed mid-round.

The other faults of issue 13 (a client, one of two combiners, the only combiner,
SIGINT/SIGTERM, kill -9 of the runner then --resume) are in test_run_e2e.py; corrupt
stores in test_network.py. Each test here runs ``fedseg run`` as its own process on the
toy app (tests/toy_clinic_app.py), kills one network process with SIGKILL while round 1
trains, and asserts what the run leaves: a non-zero exit, a run.json that says the run
did not finish and why, a round log that claims no round without a committed model, and
no process of the run still alive (checked by the recorded pids).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import read_until, run_process_records, start_fedseg_run
from test_run_e2e import _alive, _network_keys, _start_slow_toy_run, _toy_experiment

from fedseg.orchestration.runlog import GLOBAL, pivot, read_rounds, read_run_info

pytestmark = pytest.mark.slow


def _run_and_kill(tmp_path: Path, name: str, victim: str) -> tuple[int, str, Path,
                                                                     list[dict[str, Any]]]:
    """``fedseg run`` 2 rounds; SIGKILL the network process ``victim`` mid-round 1.

    Returns the exit code, the output, the run folder and every process record the
    run had (network and clients) when the victim was killed.
    """
    path = _toy_experiment(tmp_path, name, {"clinic-1": {}, "clinic-2": {}}, rounds=2,
                           network=_network_keys(),
                           session={"rounds": 2, "round_timeout": 10, "min_clients": 1})
    doc = yaml.safe_load(path.read_text())
    doc["clients"]["env"]["TOY_TRAIN_SLEEP_S"] = "3"
    path.write_text(yaml.safe_dump(doc))
    runs = tmp_path / "runs"
    proc = start_fedseg_run(path, runs, doc["clients"]["env"]["PYTHONPATH"])
    run_dir = runs / name
    output: list[str] = []
    try:
        read_until(proc, "session ", output, 180)
        time.sleep(1.5)  # the clients are inside their 3 s train call of round 1
        records = run_process_records(run_dir)
        state = json.loads((run_dir / "network" / "network.json").read_text())
        target = state["records"][victim]
        assert _alive(target)
        os.kill(int(target["pid"]), signal.SIGKILL)
        rest, _ = proc.communicate(timeout=300)
        output.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(output), run_dir, records


def _assert_true_record(code: int, text: str, run_dir: Path,
                        records: list[dict[str, Any]]) -> dict[str, Any]:
    print(f"exit {code}; output tail:\n{text[-1500:]}")
    assert code != 0, text
    assert "Traceback" not in text, text
    info = read_run_info(run_dir)
    assert info["status"].startswith(("failed", "interrupted")), info["status"]
    assert len(info["status"]) > len("failed: "), info["status"]  # a cause is named
    committed = set(info.get("model_ids") or {})
    # No rounds.csv at all is a true record too: the run logged no round.
    table = pivot(read_rounds(run_dir)) if (run_dir / "rounds.csv").is_file() else {}
    for (k, client), row in table.items():
        if client == GLOBAL and str(k) not in committed:
            # A round without a committed model must not claim aggregated updates.
            assert row.get("round_failed") == 1 or row.get("updates_aggregated", 0) == 0, \
                (k, row)
    for k in committed:
        assert (run_dir / "models" / f"round-{k}.npz").is_file()
    assert not [r["name"] for r in records if _alive(r)], text  # nothing left running
    return info


def test_api_server_killed_mid_round_ends_with_a_true_record(tmp_path: Path) -> None:
    code, text, run_dir, records = _run_and_kill(tmp_path, "dead-api", "api")
    info = _assert_true_record(code, text, run_dir, records)
    assert not info.get("model_ids"), info  # round 1 could not be committed through it
    assert "the API server has not answered" in info["status"], info["status"]


def test_s3_endpoint_killed_mid_round_ends_with_a_true_record(tmp_path: Path) -> None:
    code, text, run_dir, records = _run_and_kill(tmp_path, "dead-s3", "moto")
    _assert_true_record(code, text, run_dir, records)


def test_sigterm_twice_still_stops_everything(tmp_path: Path) -> None:
    """Issue 13: a second SIGTERM during cleanup left the S3 process running."""
    runs, proc = _start_slow_toy_run(tmp_path, "sigterm", rounds=4)
    run_dir = runs / "sigterm"
    output: list[str] = []
    try:
        read_until(proc, "round 1/4", output, 180)
        records = run_process_records(run_dir)
        assert len(records) >= 6 and all(_alive(r) for r in records)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)  # inside the cleanup: clients and network being stopped
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=120)
        output.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(output)
    assert proc.returncode == 130, text
    assert not [r["name"] for r in records if _alive(r)], text
    assert read_run_info(run_dir)["status"] == "interrupted"
    assert {r.round for r in read_rounds(run_dir)} >= {1}


def test_sigterm_during_the_budget_step_stops_the_run(tmp_path: Path) -> None:
    """Issue 13: a SIGTERM while noise was calibrated to a target epsilon was reported
    not to stop the demo (SIGINT did). Nothing but the runner runs at that point."""
    from helpers import tiny_real_experiment

    doc = tiny_real_experiment("sigterm-budget")
    doc["clinic"]["privacy"] = {"enabled": True, "target_epsilon": 4.0, "l2_norm_clip": 1.0}
    doc["session"]["rounds"] = 40  # a longer schedule: calibration takes seconds
    doc["clinic"]["training"]["local_steps"] = 10
    doc["network"] = _network_keys()
    path = tmp_path / "sigterm-budget.yaml"
    path.write_text(yaml.safe_dump(doc))
    runs = tmp_path / "runs"
    proc = start_fedseg_run(path, runs)
    output: list[str] = []
    try:
        read_until(proc, "privacy budget of clinic-1: planning", output, 180)
        tic = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        output.append(rest)
        stopped_s = time.monotonic() - tic
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(output)
    assert proc.returncode == 130, text
    assert "interrupted" in text
    info = read_run_info(runs / "sigterm-budget")
    assert info["status"] == "interrupted"
    assert "privacy_budget" not in info and "network" not in info  # stopped in the step
    assert stopped_s < 30, stopped_s
