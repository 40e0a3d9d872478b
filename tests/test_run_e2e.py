"""End to end with real FEDn processes (SQLite + moto, one combiner, hooks).

The toy app (tests/toy_clinic_app.py) is a real numpy model, so these tests exercise
FEDn's processes, our callback clients, the client-settings hook, collection, failure
reporting and shutdown - in seconds per round.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import yaml
from helpers import read_until, run_process_records, start_fedseg_run, tiny_real_experiment

from fedseg.orchestration import clients as clients_mod
from fedseg.orchestration.experiment import load_experiment
from fedseg.orchestration.network.ports import free_port
from fedseg.orchestration.runlog import GLOBAL, pivot, read_rounds, read_run_info
from fedseg.orchestration.runner import run_experiment
from fedseg_clinic.cases import FORMAT_VERSION

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
TOY_APP = "toy_clinic_app:ToyApp.from_environment"


def _network_keys(combiners: int = 1) -> dict[str, Any]:
    return {"api_port": free_port(), "s3_port": free_port(), "hooks_port": free_port(),
            "combiners": [{"name": f"combiner-{i}", "port": free_port()}
                          for i in range(1, combiners + 1)]}


def _toy_experiment(folder: Path, name: str, names: dict[str, dict[str, str]],
                    rounds: int = 2, **extra: Any) -> Path:
    """Write a toy experiment (one data folder per client) and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    for client in names:
        (folder / client).mkdir(exist_ok=True)
        # An empty but valid clinic manifest: the runner checks every clinic's organ set.
        (folder / client / "manifest.json").write_text(
            json.dumps({"clinic": client, "cases": [], "format_version": FORMAT_VERSION}))
    pythonpath = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    doc: dict[str, Any] = {
        "name": name, "seed": 3,
        "data": {"clinics": {c: c for c in names}},
        "seed_builder": "toy_clinic_app:build_seed",
        "client_settings": {"learning_rate": [0.05] * rounds, "local_steps": 3},
        "session": {"rounds": rounds, "round_timeout": 20, "min_clients": 1},
        "clients": {"app": TOY_APP, "env": {"PYTHONPATH": pythonpath}},
    }
    doc.update(extra)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def network_root(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from fedseg.orchestration.network import NetworkConfig, network_down, network_up

    root = tmp_path_factory.mktemp("net")
    config = NetworkConfig.from_dict({**_network_keys(), "hooks": True}, source="test",
                                     base=root)
    network_up(config)
    try:
        yield root
    finally:
        network_down(root)


def _client_rows(run_dir: Path) -> dict[tuple[int, str], dict[str, float]]:
    return pivot(read_rounds(run_dir))


def test_two_sessions_on_one_network_log_only_their_own_rounds(
        tmp_path: Path, network_root: Path) -> None:
    names = {"clinic-1": {}, "clinic-2": {}}
    lines: list[str] = []
    runs = tmp_path / "runs"
    first = run_experiment(load_experiment(_toy_experiment(tmp_path / "a", "first", names)),
                           runs, network_root=network_root, progress=lines.append)
    # A bystander client of somebody else is connected during run 2: the session asks
    # only its own clients (fedn's selected_clients), which also keeps the just-stopped
    # clients of run 1 (still "active" on the combiner for seconds) out of its rounds.
    from fedseg.orchestration.network import load_network_state

    bystander = clients_mod.ClientSpec("bystander", tmp_path / "a" / "clinic-1",
                                       env={"PYTHONPATH": str(TESTS)})
    state = load_network_state(network_root)  # closed by default: it needs a token
    clients_mod.clients_up(tmp_path / "other", [bystander], api_url=state.api_url,
                           app=TOY_APP, token=state.client_token)
    try:
        second = run_experiment(load_experiment(_toy_experiment(tmp_path / "b", "second",
                                                                names)),
                                runs, network_root=network_root, progress=lines.append)
    finally:
        clients_mod.stop_clients(tmp_path / "other")
    assert first.status == second.status == "finished"
    assert first.session_id != second.session_id
    for result in (first, second):
        table = _client_rows(result.run_dir)
        assert {k for k, _ in table} == {1, 2}  # global round ids 3, 4 renumbered for #2
        for k in (1, 2):
            assert table[(k, GLOBAL)]["round_seconds"] >= 0
            assert table[(k, GLOBAL)]["updates_expected"] == 2
            assert table[(k, GLOBAL)]["updates_aggregated"] == 2
            for client in names:
                row = table[(k, client)]
                assert row["num_examples"] == 40 and row["train_failed"] == 0
                assert row["learning_rate"] == 0.05  # came through the settings hook
                assert 0 < row["val_dice_mean"] <= 1
        info = read_run_info(result.run_dir)
        assert info["status"] == "finished" and info["network"]["owned"] is False
        assert sorted(info["model_ids"]) == ["1", "2"]
        assert (result.run_dir / "models" / "round-2.npz").is_file()
        assert not [h.name for h, alive in clients_mod.client_status(result.run_dir)
                    if alive]
    client_ids = [{c["client_id"] for c in read_run_info(r.run_dir)["clients"].values()}
                  for r in (first, second)]
    assert all(len(ids) == 2 for ids in client_ids) and not client_ids[0] & client_ids[1]
    ids_first = set(read_run_info(first.run_dir)["model_ids"].values())
    ids_second = set(read_run_info(second.run_dir)["model_ids"].values())
    assert not ids_first & ids_second
    # Each run starts its own client processes: the toy's call counter starts again.
    assert _client_rows(second.run_dir)[(2, "clinic-1")]["epsilon"] == 2.0
    assert any(line.startswith("round 2/2  clinic-1 dice") for line in lines)


def test_failed_and_killed_clients_are_named_in_the_log(tmp_path: Path,
                                                        network_root: Path) -> None:
    path = _toy_experiment(tmp_path, "faults", {"clinic-1": {}, "clinic-2": {}, "clinic-3": {}},
                           session={"rounds": 2, "round_timeout": 8, "min_clients": 1})
    exp = load_experiment(path)
    run_dir = tmp_path / "runs" / "faults"
    # clinic-2 raises in its first train call; clinic-3 is slow and gets killed mid-round.
    per_client = {"clinic-2": {"TOY_FAIL_ON_CALL": "1"}, "clinic-3": {"TOY_TRAIN_SLEEP_S": "4"}}
    killed: list[int] = []

    def kill_clinic_3() -> None:
        handle = next(h for h in clients_mod.load_clients(run_dir) if h.name == "clinic-3")
        os.kill(handle.record.pid, signal.SIGKILL)
        killed.append(handle.record.pid)

    def progress(line: str) -> None:
        if line.startswith("session "):
            threading.Timer(1.5, kill_clinic_3).start()

    result = run_experiment(exp, tmp_path / "runs", network_root=network_root,
                            progress=progress, client_env=per_client)
    assert killed
    assert result.status == "finished"
    table = _client_rows(result.run_dir)
    assert table[(1, "clinic-1")]["train_failed"] == 0
    assert table[(1, "clinic-2")]["train_failed"] == 1
    assert table[(1, "clinic-3")]["train_failed"] == 1
    assert table[(2, "clinic-2")]["train_failed"] == 0  # it recovered: process stayed up
    assert table[(2, "clinic-3")]["train_failed"] == 1
    assert table[(1, GLOBAL)]["updates_aggregated"] == 1
    failures = {(f["round"], f["client"]): f["error"] for f in result.failures}
    assert "asked to fail on train call 1" in failures[(1, "clinic-2")]
    assert "no update" in failures[(1, "clinic-3")]
    assert read_run_info(result.run_dir)["failures"] == result.failures


def test_a_round_refused_for_budget_mid_session_ends_the_run_promptly(tmp_path: Path) -> None:
    """clinic-2's ledger cannot afford round 2 (budget spent elsewhere since the plan).

    A run-owned network: fedn's combiner itself keeps waiting for the refused update
    until its round timeout (docs/reliability.md), so a shared one would stay busy.
    """
    path = _toy_experiment(tmp_path, "budget-stop", {"clinic-1": {}, "clinic-2": {}}, rounds=4,
                           session={"rounds": 4, "round_timeout": 300, "min_clients": 1},
                           network=_network_keys())
    exp = load_experiment(path)
    session_started: list[float] = []

    def progress(line: str) -> None:
        if line.startswith("session "):
            session_started.append(time.monotonic())

    result = run_experiment(exp, tmp_path / "runs", progress=progress,
                            client_env={"clinic-2": {"TOY_BUDGET_REFUSE_ON_CALL": "2"}})
    elapsed = time.monotonic() - session_started[0]
    assert elapsed < 60, elapsed  # not the 300 s round timeout
    assert result.status == "budget-limited"
    info = read_run_info(result.run_dir)
    assert info["rounds_done"] == 2 and info["rounds_failed"] == 1
    assert info["rounds"][1]["failed"] and info["rounds"][1]["status"] == "Terminated"
    cause = info["rounds"][1]["cause"]
    assert cause.startswith("budget: refused for the privacy budget (clinic-2: "
                            "BudgetExceededError: toy app clinic-2: epsilon 9.0"), cause
    assert info["budget_stop"] == [{"round": 2, "cause": cause}]
    table = _client_rows(result.run_dir)
    assert table[(1, GLOBAL)]["round_failed"] == 0
    assert table[(2, GLOBAL)]["round_failed"] == 1
    assert table[(2, "clinic-2")]["train_failed"] == 1
    assert sorted(info["model_ids"]) == ["1"]


def _alive(record: dict[str, Any]) -> bool:
    try:
        proc = psutil.Process(int(record["pid"]))
        return (abs(proc.create_time() - float(record["create_time"])) < 1.0
                and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False



def _start_slow_toy_run(tmp_path: Path, name: str, rounds: int
                        ) -> tuple[Path, subprocess.Popen]:
    """`fedseg run` of two toy clinics that train 1.5 s per round, as a child process.

    Returns:
        (the runs folder, the process).
    """
    path = _toy_experiment(tmp_path, name, {"clinic-1": {}, "clinic-2": {}}, rounds=rounds,
                           network=_network_keys())
    doc = yaml.safe_load(path.read_text())
    doc["clients"]["env"]["TOY_TRAIN_SLEEP_S"] = "1.5"
    path.write_text(yaml.safe_dump(doc))
    runs = tmp_path / "runs"
    proc = start_fedseg_run(path, runs, doc["clients"]["env"]["PYTHONPATH"])
    return runs, proc


def test_ctrl_c_stops_everything_and_keeps_the_log(tmp_path: Path) -> None:
    runs, proc = _start_slow_toy_run(tmp_path, "sigint", rounds=4)
    run_dir = runs / "sigint"
    records: list[dict[str, Any]] = []
    output: list[str] = []
    try:
        read_until(proc, "round 1/4", output, 120)
        records = run_process_records(run_dir)
        assert len(records) >= 6 and all(_alive(r) for r in records)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=90)
        output.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(output)
    assert proc.returncode == 130, text
    assert "interrupted" in text
    assert not [r["name"] for r in records if _alive(r)]
    info = read_run_info(run_dir)
    assert info["status"] == "interrupted"
    rows = read_rounds(run_dir)
    assert {r.round for r in rows} >= {1}
    assert {r.client for r in rows if r.round == 1} == {GLOBAL, "clinic-1", "clinic-2"}


def test_real_clinic_app_on_tiny_phantoms(tmp_path: Path, network_root: Path) -> None:
    doc = tiny_real_experiment("tiny-real", FEDSEG_KEEP_UPDATES="1")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = run_experiment(load_experiment(path), tmp_path / "runs", network_root=network_root)
    assert result.status == "finished" and result.failures == []
    table = _client_rows(result.run_dir)
    for client in ("clinic-1", "clinic-2"):
        assert table[(2, client)]["epsilon"] > table[(1, client)]["epsilon"] > 0
        for k in (1, 2):
            row = table[(k, client)]
            assert row["noise_multiplier"] == 1.0 and row["train_failed"] == 0
            assert 0.0 <= row["val_dice_mean"] <= 1.0
    # The non-iid preset's last clinic does not contour the spinal cord: NaN, never 0.
    assert np.isnan(table[(1, "clinic-2")]["val_dice_spinal_cord"])
    assert not np.isnan(table[(1, "clinic-1")]["val_dice_spinal_cord"])
    assert (result.run_dir / "models" / "round-2.npz").is_file()
    # The run records its organ set and clinics; round 2 exports with a model card.
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["organ_set"]["name"] == "thorax"
    assert set(info["clinic_data"]) == {"clinic-1", "clinic-2"}
    from fedseg.orchestration.export import export_model
    from fedseg_clinic.model.bundle import load_model, read_card

    card = read_card(export_model(result.run_dir, 2, tmp_path / "exported"))
    assert card["clinics"] == ["clinic-1", "clinic-2"] and card["round"] == 2
    assert card["privacy"]["clinic-1"]["epsilon"] == pytest.approx(
        table[(2, "clinic-1")]["epsilon"])
    assert card["validation_dice"]["per_organ"]["spinal_cord"] is not None
    assert load_model(tmp_path / "exported").organs.name == "thorax"
    settings = yaml.safe_load((result.run_dir / "settings" / "clinic-1.yaml").read_text())
    assert settings["model"]["base_filters"] == 4
    assert settings["training"]["seed"] == 5  # experiment seed + clinic index 0
    # Kept updates (FEDSEG_KEEP_UPDATES) let the inversion attack target a real round.
    updates = result.run_dir / "clients" / "clinic-1" / "state" / "updates"
    record = json.loads((updates / "update-2.json").read_text())
    assert record["training_metadata"]["local_steps"] == 2
    from click.testing import CliRunner

    from fedseg.cli import cli

    answer = CliRunner().invoke(cli, [
        "attack", "invert", "--levels", "2", "--base-filters", "4", "--groups", "2",
        "--global-weights", str(result.run_dir / "models" / "round-1.npz"),
        "--client-weights", str(updates / "update-2.npz"), "--batch", "2",
        "--local-steps", "2", "--patch", "16", "--optimizer", "adam", "--lr", "0.003",
        "--iterations", "3", "--out", str(tmp_path / "attack")])
    assert answer.exit_code == 0, answer.output
    attack = json.loads((tmp_path / "attack" / "results.json").read_text())
    assert np.isfinite(attack["objective"])


def test_auth_network_admits_callback_clients_with_their_token(tmp_path: Path) -> None:
    path = _toy_experiment(tmp_path, "auth", {"clinic-1": {}}, rounds=1,
                           network={**_network_keys(), "auth": True})
    result = run_experiment(load_experiment(path), tmp_path / "runs")
    assert result.status == "finished", result
    row = _client_rows(result.run_dir)[(1, "clinic-1")]
    assert row["train_failed"] == 0 and 0 < row["val_dice_mean"] <= 1
    assert (result.run_dir / "models" / "round-1.npz").is_file()
    log = (result.run_dir / "clients" / "clinic-1" / "client.log").read_text()
    assert "UNAUTHENTICATED" not in log


def test_package_route_runs_the_compute_package_entry_points(tmp_path: Path,
                                                             network_root: Path) -> None:
    # tests/fednpkg_numpy: train adds "step" (default 1) to every weight; numpy only.
    path = _toy_experiment(tmp_path, "pkg", {"clinic-1": {}, "clinic-2": {}}, rounds=2,
                           package=str(TESTS / "fednpkg_numpy"), client_settings={},
                           clients={"route": "package"},
                           # A package-route client's first call extracts the package and
                           # starts Python: on a loaded CI machine that can outlast 20 s,
                           # and the round would then close without it.
                           session={"rounds": 2, "round_timeout": 120, "min_clients": 2})
    result = run_experiment(load_experiment(path), tmp_path / "runs", network_root=network_root)
    assert result.status == "finished", result
    table = _client_rows(result.run_dir)
    for k in (1, 2):
        for client in ("clinic-1", "clinic-2"):
            assert table[(k, client)]["num_examples"] == 10
            assert table[(k, client)]["step"] == 1.0
    # Round 2 trains from round 1's global model (all ones): train_loss is its mean.
    assert table[(2, "clinic-1")]["train_loss"] == 1.0
    work = result.run_dir / "clients" / "clinic-1" / "work" / "package"
    assert (work / "fedn.yaml").is_file()


def test_round_log_on_managed_postgres(tmp_path: Path) -> None:
    """The same run and round log against a managed PostgreSQL state store."""
    import shutil
    import tempfile

    from fedseg.orchestration.network.stores import find_postgres_bindir

    if find_postgres_bindir() is None:
        pytest.skip("PostgreSQL's initdb/postgres are not installed")
    network = {**_network_keys(), "statestore": "postgres-managed",
               "postgres_port": free_port()}
    session = {"rounds": 2, "round_timeout": 60, "min_clients": 1}
    # The postgres user must be able to enter the run folder (pytest's tmp is 0700).
    base = Path(tempfile.mkdtemp(prefix="fedseg-e2e-pg-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        names = {"clinic-1": {}, "clinic-2": {}}
        path = _toy_experiment(base / "exp", "pg", names, network=network, session=session)
        result = run_experiment(load_experiment(path), base / "runs")
        assert result.status == "finished", result
        table = _client_rows(result.run_dir)
        assert {k for k, _ in table} == {1, 2}
        for k in (1, 2):
            assert table[(k, GLOBAL)]["updates_expected"] == 2
            assert table[(k, GLOBAL)]["updates_aggregated"] == 2
            for client in names:
                assert table[(k, client)]["num_examples"] == 40
                assert 0 < table[(k, client)]["val_dice_mean"] <= 1
        info = read_run_info(result.run_dir)
        assert info["status"] == "finished" and info["network"]["owned"] is True
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_round_log_with_clients_split_over_two_combiners(tmp_path: Path) -> None:
    """Hierarchical FEDn: a client on each of two combiners, both in every round."""
    network = _network_keys(combiners=2)
    names = {"clinic-1": {}, "clinic-2": {}, "clinic-3": {}}
    path = _toy_experiment(tmp_path / "exp", "two", names, network=network,
                           session={"rounds": 2, "round_timeout": 60, "min_clients": 1})
    result = run_experiment(load_experiment(path), tmp_path / "runs")
    assert result.status == "finished", result
    table = _client_rows(result.run_dir)
    for k in (1, 2):
        # Both combiners report: expected updates add up over them.
        assert table[(k, GLOBAL)]["updates_expected"] == 3
        assert table[(k, GLOBAL)]["updates_aggregated"] == 3
        for client in names:
            assert table[(k, client)]["train_failed"] == 0
            assert 0 < table[(k, client)]["val_dice_mean"] <= 1
    # Clients were split in turn: clinic-1 and clinic-3 on combiner-1, clinic-2 on 2.
    attached = {p.parent.name: json.loads(p.read_text())["combiner"]
                for p in (result.run_dir / "clients").glob("*/ready.json")}
    port = {c["name"]: f"127.0.0.1:{c['port']}" for c in network["combiners"]}
    assert attached == {"clinic-1": port["combiner-1"], "clinic-2": port["combiner-2"],
                        "clinic-3": port["combiner-1"]}
    for i in (1, 2):
        log = (result.run_dir / "network" / "logs" / f"combiner-{i}.log").read_text()
        assert "TRAINING ROUND COMPLETED" in log
        assert "Traceback" not in log  # e.g. a round thread killed by a shared model dir


def test_combiner_killed_mid_round_fails_that_round_and_the_session_goes_on(
        tmp_path: Path) -> None:
    """fedn's controller waited forever for a dead combiner's report (bug 12)."""
    from fedseg.orchestration.network import load_network_state

    network = _network_keys(combiners=2)
    names = {"clinic-1": {}, "clinic-2": {}, "clinic-3": {}}
    path = _toy_experiment(tmp_path / "exp", "dead-combiner", names, network=network,
                           session={"rounds": 2, "round_timeout": 10, "min_clients": 1})
    run_dir = tmp_path / "runs" / "dead-combiner"
    slow = {"TOY_TRAIN_SLEEP_S": "3"}
    killed: list[int] = []

    def kill_combiner_2() -> None:
        state = load_network_state(run_dir / "network")
        pid = next(c.pid for c in state.combiners if c.name == "combiner-2")
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    def progress(line: str) -> None:
        if line.startswith("session "):
            threading.Timer(1.5, kill_combiner_2).start()

    tic = time.monotonic()
    result = run_experiment(load_experiment(path), tmp_path / "runs", progress=progress,
                            client_env={n: slow for n in names})
    assert killed
    # Round 1 timed out at the dead combiner and failed; round 2 ran on combiner-1.
    assert result.status == "finished", result
    assert time.monotonic() - tic < 120
    table = _client_rows(result.run_dir)
    assert table[(2, GLOBAL)]["updates_aggregated"] >= 2
    for client in ("clinic-1", "clinic-3"):  # the clients of combiner-1
        assert table[(2, client)]["train_failed"] == 0
    # clinic-2's combiner is gone; fedn does not move it: the log names it in both rounds.
    assert table[(1, "clinic-2")]["train_failed"] == table[(2, "clinic-2")]["train_failed"] == 1
    assert {f["round"] for f in result.failures if f["client"] == "clinic-2"} == {1, 2}
    info = read_run_info(result.run_dir)
    assert list(info["model_ids"]) == ["2"]
    # Round 1 committed no model: a failed round, blamed on the dead combiner, even
    # though combiner-1's clients trained and their updates arrived.
    assert table[(1, GLOBAL)]["round_failed"] == 1 and table[(2, GLOBAL)]["round_failed"] == 0
    assert table[(1, GLOBAL)]["updates_aggregated"] == 0
    assert table[(1, "clinic-1")]["train_failed"] == 0
    assert info["rounds_failed"] == 1 and info["rounds"][0]["failed"]
    assert info["rounds"][0]["cause"].startswith("combiner died (combiner-2)")
    assert {"round": 1, "client": GLOBAL, "task": "round",
            "error": info["rounds"][0]["cause"]} in result.failures


def test_only_combiner_killed_fails_the_run_and_blames_the_combiner(tmp_path: Path) -> None:
    """Issue 13: the only combiner killed ended "finished", exit 0, clients blamed."""
    from fedseg.commands.run import exit_code
    from fedseg.orchestration.network import load_network_state
    from fedseg.orchestration.runner import RunResult

    names = {"clinic-1": {}, "clinic-2": {}}
    path = _toy_experiment(tmp_path / "exp", "no-combiner", names, rounds=1,
                           network=_network_keys(),
                           session={"rounds": 1, "round_timeout": 10, "min_clients": 1})
    run_dir = tmp_path / "runs" / "no-combiner"
    env = {"TOY_TRAIN_SLEEP_S": "3"}

    def kill_combiner() -> None:
        state = load_network_state(run_dir / "network")
        os.kill(state.combiners[0].pid, signal.SIGKILL)

    def progress(line: str) -> None:
        if line.startswith("session "):
            threading.Timer(1.5, kill_combiner).start()

    tic = time.monotonic()
    try:
        result = run_experiment(load_experiment(path), tmp_path / "runs", progress=progress,
                                client_env={n: env for n in names})
        status, failures = result.status, result.failures
    except Exception as exc:  # noqa: BLE001 - a session that never ends is a failure too
        status, failures = f"failed: {exc}", read_run_info(run_dir)["failures"]
    assert time.monotonic() - tic < 240
    assert status.startswith("failed"), status
    info = read_run_info(run_dir)
    assert info["status"].startswith("failed") and not info.get("model_ids")
    # Whatever the API still answered, no failure blames a client for a dead combiner.
    for failure in failures:
        assert "client down" not in failure["error"], failure
    assert exit_code(RunResult(run_dir, info["status"], None, 0, failures)) == 1


def test_kill_9_of_the_runner_then_resume(tmp_path: Path) -> None:
    """Issue 13: kill -9 left six processes and run.json "running"; now --resume."""
    from fedseg.orchestration.runner import resume_run

    runs, proc = _start_slow_toy_run(tmp_path, "killed", rounds=3)
    run_dir = runs / "killed"
    output: list[str] = []
    try:
        read_until(proc, "round 1/3", output, 120)
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    state = json.loads((run_dir / "network" / "network.json").read_text())
    left = list(state["records"].values())
    left += [h.record.to_dict() for h in clients_mod.load_clients(run_dir)]
    assert any(_alive(r) for r in left)  # what kill -9 leaves behind
    assert read_run_info(run_dir)["status"] == "running"
    lines: list[str] = []
    result = resume_run(run_dir, progress=lines.append)
    assert any(line.startswith("stopped what the interrupted run left running")
               for line in lines), lines
    assert not [r["name"] for r in left if _alive(r)]  # found and stopped by their pids
    assert result.status == "finished", result
    rows = read_rounds(run_dir)
    assert {r.round for r in rows} == {1, 2, 3}  # numbered on after the logged rounds
    info = read_run_info(run_dir)
    assert info["status"] == "finished" and info["resumed"][0]["previous_status"] == "running"
    done = info["resumed"][0]["after_round"]
    assert done >= 1 and set(info["model_ids"]) == {"1", "2", "3"}
    assert (run_dir / "models" / "round-3.npz").is_file()
    assert (run_dir / "network.before-resume-1").is_dir()
    # Nothing of the resumed run is left running either.
    now = [h.record.to_dict() for h in clients_mod.load_clients(run_dir)]
    assert not [r["name"] for r in now if _alive(r)]
    with pytest.raises(Exception, match="nothing to resume"):
        resume_run(run_dir)


def test_fedavgm_global_models_follow_server_momentum(tmp_path: Path,
                                                      network_root: Path) -> None:
    """Through FEDn's hooks process, each global model is the FedAvgM step of the updates."""
    from fedn.utils.helpers.helpers import get_helper
    from toy_clinic_app import ToyApp

    clinics = {"clinic-1": {}, "clinic-2": {}}
    session = {"rounds": 3, "round_timeout": 20, "min_clients": 1, "aggregator": "fedavgm",
               "aggregator_kwargs": {"learning_rate": 0.5, "momentum": 0.9}}
    path = _toy_experiment(tmp_path, "fedavgm", clinics, rounds=3, session=session)
    result = run_experiment(load_experiment(path), tmp_path / "runs", network_root=network_root)
    assert result.status == "finished" and result.failures == []
    # The toy clinics are deterministic: replay the rounds here.
    apps = [ToyApp(name) for name in clinics]
    glob, velocity = np.zeros(4), np.zeros(4)
    helper = get_helper("numpyhelper")
    for k in (1, 2, 3):
        fedavg = np.mean([app.train([glob], {"learning_rate": 0.05, "local_steps": 3})[0][0]
                          for app in apps], axis=0)  # equal num_examples
        velocity = 0.9 * velocity + (fedavg - glob)
        glob = glob + 0.5 * velocity
        got = helper.load(str(result.run_dir / "models" / f"round-{k}.npz"))[0]
        assert np.allclose(got, glob, atol=1e-6), (k, got, glob)
        if k > 1:
            assert not np.allclose(got, fedavg, atol=1e-3)  # not plain FedAvg
    info = json.loads((result.run_dir / "run.json").read_text())
    assert info["config"]["session"]["aggregator"] == "fedavgm"
