"""Privacy budgets decided before a session: composed across runs, dropped, shortened, refused.

Real files throughout (phantom clinics, the clinics' ledgers, run folders); no FEDn:
every decision here happens before any process would start.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from fedseg.cli import cli
from fedseg.orchestration import budget
from fedseg.orchestration.experiment import load_experiment
from fedseg.orchestration.phantoms import generate_benchmark, preset_spec
from fedseg.orchestration.runlog import read_run_info
from fedseg.orchestration.runner import run_experiment
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.privacy.accounting import compute_epsilon, default_delta
from fedseg_clinic.privacy.budget import training_patients
from fedseg_clinic.privacy.ledger import (
    LedgerSegment,
    PrivacyLedger,
    data_identity,
    default_privacy_dir,
    ledger_path,
)

STEPS, BATCH, SIGMA = 4, 2, 1.0


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("phantoms") / "bench"
    generate_benchmark(preset_spec("iid", clinics=2, patients=6, size=24, seed=1), out)
    return out


@pytest.fixture
def clinics(phantom_root: Path, tmp_path: Path) -> dict[str, Path]:
    """A fresh copy of the two clinics' data (each test owns its ledgers)."""
    out = {}
    for name in ("clinic-1", "clinic-2"):
        out[name] = tmp_path / "data" / name
        shutil.copytree(phantom_root / name, out[name])
    return out


def _epsilon(data: Path, rounds: int) -> float:
    n = len(training_patients(data))
    return compute_epsilon(n, BATCH, rounds * STEPS, SIGMA, default_delta(n)).epsilon


def _spend(data: Path, rounds: int, run: str = "earlier-run") -> None:
    """What an earlier run left in the data set's ledger (via the clinic's own API)."""
    patients = training_patients(data)
    data_id = data_identity(patients)
    ledger = PrivacyLedger(ledger_path(default_privacy_dir(data), data_id), data_id,
                           default_delta(len(patients)), None)
    for k in range(rounds):
        ledger.reserve(LedgerSegment.for_schedule(f"{run}-{k}", len(patients), BATCH, STEPS,
                                                  SIGMA, 1.0), client="x", run=run)


def _experiment(tmp_path: Path, clinics: dict[str, Path], budget_eps: float, rounds: int = 5,
                **extra: Any) -> Path:
    doc: dict[str, Any] = {
        "name": "budgeted", "seed": 1, "ledgers": "data",
        "data": {"clinics": {n: str(p) for n, p in clinics.items()}},
        "model": {"levels": 2, "base_filters": 4, "groups": 2},
        "clinic": {"training": {"local_steps": STEPS, "batch_size": BATCH,
                                "patch_size": [16, 16, 16]},
                   "privacy": {"noise_multiplier": SIGMA, "epsilon_budget": budget_eps}},
        "session": {"rounds": rounds, "min_clients": 1},
    }
    doc.update(extra)
    path = tmp_path / "budgeted.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _decide(tmp_path: Path, path: Path, lines: list[str]) -> budget.BudgetDecision:
    from fedseg.orchestration.runner import write_clinic_settings

    exp = load_experiment(path)
    data = dict(exp.data.clinic_dirs)
    files = {n: write_clinic_settings(exp, tmp_path / "run", n, i)
             for i, n in enumerate(data)}
    return budget.decide(exp, tmp_path / "run", data, files, lines.append)


@pytest.mark.slow  # epsilon by PLD: about 1 s per plan on a shared CPU
def test_earlier_runs_compose_and_shorten_the_session(tmp_path: Path,
                                                      clinics: dict[str, Path]) -> None:
    one = clinics["clinic-1"]
    # A budget for 4 rounds; an earlier run on the same data spent 2 of them.
    path = _experiment(tmp_path, clinics, _epsilon(one, 4) * 1.0001)
    _spend(clinics["clinic-1"], 2)
    lines: list[str] = []
    decision = _decide(tmp_path, path, lines)
    assert decision.clinics == ["clinic-1", "clinic-2"] and not decision.dropped
    assert decision.rounds == 2 and decision.planned_rounds == 5 and decision.limited
    plan = decision.plans["clinic-1"]
    assert plan["spent"] == pytest.approx(_epsilon(one, 2), rel=1e-6)
    assert plan["affordable_rounds"] == 2
    assert decision.plans["clinic-2"]["affordable_rounds"] == 4
    assert any("session shortened to 2 of 5 rounds" in line and "clinic-1" in line
               for line in lines)


@pytest.mark.slow  # epsilon by PLD: about 1 s per plan on a shared CPU
def test_exhausted_clinic_is_dropped_with_a_log_line(tmp_path: Path,
                                                     clinics: dict[str, Path]) -> None:
    path = _experiment(tmp_path, clinics, _epsilon(clinics["clinic-1"], 3) * 1.0001,
                       rounds=3)
    _spend(clinics["clinic-2"], 3)
    lines: list[str] = []
    decision = _decide(tmp_path, path, lines)
    assert decision.clinics == ["clinic-1"] and list(decision.dropped) == ["clinic-2"]
    assert decision.rounds == 3
    assert any(line.startswith("clinic-2 dropped from the session: privacy budget: round 1")
               for line in lines)


@pytest.mark.slow  # epsilon by PLD: about 1 s per plan on a shared CPU
def test_run_refused_up_front_exit_3_and_ledger_survives_overwrite(
        tmp_path: Path, clinics: dict[str, Path]) -> None:
    path = _experiment(tmp_path, clinics, _epsilon(clinics["clinic-1"], 2) * 1.0001,
                       session={"rounds": 2, "min_clients": 2})
    for data in clinics.values():
        _spend(data, 2)
    before = {n: sorted((default_privacy_dir(d)).iterdir()) for n, d in clinics.items()}
    runs = tmp_path / "runs"
    with pytest.raises(budget.BudgetRefusedError, match="0 of 2 clinics can afford round 1"):
        run_experiment(load_experiment(path), runs)
    info = read_run_info(runs / "budgeted")
    assert info["status"].startswith("refused: privacy budget")
    assert set(info["privacy_budget"]["dropped"]) == {"clinic-1", "clinic-2"}
    assert not (runs / "budgeted" / "network").exists()  # nothing was started
    answer = CliRunner().invoke(cli, ["run", str(path), "--runs-dir", str(runs),
                                      "--overwrite"])
    assert answer.exit_code == budget.EXIT_BUDGET, answer.output
    assert "refused: privacy budget" in answer.output
    # --overwrite cleared the run folder, never the data's ledgers.
    assert {n: sorted((default_privacy_dir(d)).iterdir()) for n, d in clinics.items()} == before


@pytest.mark.slow  # epsilon by PLD: about 1 s per plan on a shared CPU
def test_privacy_show_and_reset_cli(tmp_path: Path, clinics: dict[str, Path]) -> None:
    data = clinics["clinic-1"]
    _spend(data, 2)
    runner = CliRunner()
    shown = runner.invoke(cli, ["privacy", "show", str(data), "--json"])
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.output)
    assert report["ledgers"][0]["rounds"] == 2
    assert report["epsilon_all"] == pytest.approx(_epsilon(data, 2), rel=1e-6)
    refused = runner.invoke(cli, ["privacy", "reset", str(data), "--reason", "new protocol"])
    assert refused.exit_code == 1 and "--yes" in refused.output
    done = runner.invoke(cli, ["privacy", "reset", str(data), "--reason", "new protocol",
                               "--yes"])
    assert done.exit_code == 0, done.output
    assert "2 rounds" in done.output
    empty = runner.invoke(cli, ["privacy", "show", str(data)])
    assert empty.exit_code == 1 and "no privacy ledger" in empty.output


def test_run_scoped_ledgers_only_for_phantom_data(tmp_path: Path,
                                                  clinics: dict[str, Path]) -> None:
    manifest = clinics["clinic-2"] / "manifest.json"
    data = json.loads(manifest.read_text())
    data["extra"]["source"] = "import"  # as if it were imported patient data
    manifest.write_text(json.dumps(data))
    exp = load_experiment(_experiment(tmp_path, clinics, 10.0, ledgers="run"))
    with pytest.raises(FedsegError, match=r"clinic-2.*not phantom data"):
        budget.check_synthetic(exp, dict(exp.data.clinic_dirs))
    env = budget.client_privacy_env(exp, tmp_path / "run", "clinic-1")
    assert env == {"FEDSEG_RUN_NAME": "budgeted",
                   "FEDSEG_PRIVACY_DIR": str(tmp_path / "run" / "privacy" / "clinic-1")}


def test_overwrite_refuses_a_run_folder_holding_a_data_sets_ledger(
        tmp_path: Path, phantom_root: Path) -> None:
    runs = tmp_path / "runs"
    inside = runs / "budgeted" / "data" / "clinic-1"
    shutil.copytree(phantom_root / "clinic-1", inside)
    _spend(inside, 1)
    path = _experiment(tmp_path, {"clinic-1": inside}, 100.0)
    with pytest.raises(FedsegError, match="never deletes one"):
        run_experiment(load_experiment(path), runs, overwrite=True)
    assert default_privacy_dir(inside).is_dir()


def test_target_epsilon_plans_the_calibrated_noise_and_target_budget(
        tmp_path: Path, clinics: dict[str, Path]) -> None:
    """A target epsilon covers the session: every planned round fits, none more."""
    from fedseg_clinic.privacy.accounting import calibrate_noise

    path = _experiment(tmp_path, clinics, 100.0, rounds=3)
    doc = yaml.safe_load(path.read_text())
    doc["clinic"]["privacy"] = {"target_epsilon": 3.0}
    doc["clinic"]["training"].update(trainable="norm_bias", augmentations_per_patient=2)
    path.write_text(yaml.safe_dump(doc))
    lines: list[str] = []
    decision = _decide(tmp_path, path, lines)
    assert decision.rounds == 3 and set(decision.clinics) == set(clinics)
    for name, data in clinics.items():
        n = len(training_patients(data))
        sigma = calibrate_noise(n, BATCH, 3 * STEPS, 3.0, default_delta(n))
        plan = decision.plans[name]
        assert plan["epsilon_after"] == pytest.approx(
            compute_epsilon(n, BATCH, 3 * STEPS, sigma, default_delta(n)).epsilon)
        assert 2.8 < plan["epsilon_after"] <= 3.0
    # The same data asked for one more round than the target covers: refused up front.
    _spend(clinics["clinic-1"], 1, run="before")
    decision = _decide(tmp_path, path, lines)
    assert "clinic-1" not in decision.clinics or decision.rounds < 3


def test_plan_uses_the_noise_a_target_epsilon_calibrates(clinics: dict[str, Path]) -> None:
    """With privacy.target_epsilon the plan spends what ClinicApp.train will: the
    calibrated sigma, the target as budget; the planned rounds fit, one more does not."""
    from fedseg_clinic.privacy.budget import plan_rounds, resolve_noise
    from fedseg_clinic.settings import settings_from_mapping

    settings = settings_from_mapping({
        "data_dir": str(clinics["clinic-1"]), "client_name": "clinic-1",
        "training": {"batch_size": BATCH, "local_steps": STEPS},
        "privacy": {"target_epsilon": 3.0, "planned_rounds": 2},
    }, "test")
    n = len(training_patients(clinics["clinic-1"]))
    sigma, budget_eps = resolve_noise(n, settings)
    assert budget_eps == 3.0 and sigma > 0
    exact = compute_epsilon(n, BATCH, 2 * STEPS, sigma, default_delta(n)).epsilon
    assert 2.5 < exact <= 3.0
    plan = plan_rounds(settings, [{}, {}, {}])
    assert plan.affordable_rounds == 2 and "round 3" in plan.reason
    assert plan.epsilon_after == pytest.approx(exact, rel=1e-3)


@pytest.mark.parametrize(("server", "refused"), [
    ({"dp": False}, "dp off"),
    ({"noise_multiplier": 0.5}, "noise_multiplier 0.5 < 1.1"),
    ({"epsilon_budget": 20.0}, "epsilon budget 20.0 > 8"),
    ({"delta": 1e-3}, "delta 0.001 > 0.0001"),
    ({"noise_multiplier": 2.0, "epsilon_budget": 4.0, "delta": 1e-5}, None),  # stronger
    ({"learning_rate": 0.1, "local_steps": 7}, None),
])
def test_server_settings_cannot_weaken_a_clinics_privacy(server: dict[str, Any],
                                                         refused: str | None) -> None:
    from fedseg_clinic.privacy.budget import check_privacy_floor
    from fedseg_clinic.settings import settings_from_mapping, with_server_overrides

    clinic = settings_from_mapping({"client_name": "clinic-1", "privacy": {
        "noise_multiplier": 1.1, "epsilon_budget": 8.0, "delta": 1e-4}}, "test")
    merged = with_server_overrides(clinic, server)
    if refused is None:
        check_privacy_floor(50, clinic, merged)
    else:
        with pytest.raises(FedsegError, match=re.escape(refused)) as info:
            check_privacy_floor(50, clinic, merged)
        assert "clinic-1's privacy" in str(info.value) and "floor" in str(info.value)


def test_budget_plan_refuses_a_session_that_weakens_dp(clinics: dict[str, Path]) -> None:
    from fedseg_clinic.privacy.budget import plan_rounds
    from fedseg_clinic.settings import settings_from_mapping

    settings = settings_from_mapping({
        "data_dir": str(clinics["clinic-1"]), "client_name": "clinic-1",
        "training": {"batch_size": BATCH, "local_steps": STEPS},
        "privacy": {"noise_multiplier": SIGMA}}, "test")
    with pytest.raises(FedsegError, match=r"noise_multiplier 0\.3 < 1"):
        plan_rounds(settings, [{}, {"noise_multiplier": 0.3}])


def test_plan_spends_the_steps_local_epochs_give(clinics: dict[str, Path]) -> None:
    """With local_epochs the ledger plan spends ceil(E N / B) steps per round."""
    import math

    from fedseg_clinic.privacy.budget import plan_rounds
    from fedseg_clinic.settings import settings_from_mapping

    settings = settings_from_mapping({
        "data_dir": str(clinics["clinic-1"]), "client_name": "clinic-1",
        "training": {"batch_size": BATCH, "local_steps": 1, "local_epochs": 2.0},
        "privacy": {"noise_multiplier": SIGMA}}, "test")
    n = len(training_patients(clinics["clinic-1"]))
    steps = math.ceil(2.0 * n / BATCH)
    plan = plan_rounds(settings, [{}])
    expected = compute_epsilon(n, BATCH, steps, SIGMA, default_delta(n)).epsilon
    assert steps > 1 and plan.epsilon_after == pytest.approx(expected, rel=1e-3)


@pytest.mark.slow  # three noise calibrations
def test_secure_session_plans_its_training_rounds_after_the_key_round(
        tmp_path: Path, clinics: dict[str, Path], phantom_root: Path) -> None:
    """FEDn round 1 of a secure session only exchanges keys: a distributed-DP target
    epsilon over rounds 2..N must not shorten the session by one round (it did: the
    plan counted N spending rounds against noise calibrated for N - 1)."""
    clinics = {**clinics, "clinic-3": tmp_path / "data" / "clinic-3"}
    shutil.copytree(phantom_root / "clinic-1", clinics["clinic-3"])
    path = _experiment(tmp_path, clinics, 100.0,
                       session={"rounds": 4, "min_clients": 3, "secure_aggregation": True})
    doc = yaml.safe_load(path.read_text())
    doc["clinic"]["privacy"] = {"target_epsilon": 3.0, "distributed": True}
    path.write_text(yaml.safe_dump(doc))
    lines: list[str] = []
    decision = _decide(tmp_path, path, lines)
    assert decision.rounds == 4 and not decision.limited, lines
    assert sum("3 of 3 training rounds fit" in line for line in lines) == 3, lines
    for plan in decision.plans.values():
        assert 2.8 < plan["epsilon_after"] <= 3.0
