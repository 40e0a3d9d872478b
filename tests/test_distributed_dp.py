"""Distributed DP under secure aggregation: sampler, sensitivity, accounting, protocol.

The accountant is checked against dp_accounting (Skellam tends to the Gaussian mechanism
as its variance grows), the sensitivity against a hand computation, and the protocol
objects (SecAggClinic / SecAggServer, as in test_secagg.py) against the plain sum. The
same path through real FEDn processes is test_secagg_e2e.py's distributed test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from click.testing import CliRunner
from dp_accounting.rdp import rdp_privacy_accountant

from fedseg.cli import cli
from fedseg.orchestration.secure_aggregation import SecAggServer
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.privacy import skellam
from fedseg_clinic.privacy.accounting import (
    PrivacySegment,
    calibrate_noise,
    compute_epsilon,
    compute_epsilon_history,
)
from fedseg_clinic.privacy.distributed import noised_sum
from fedseg_clinic.privacy.ledger import LedgerSegment, PrivacyLedger
from fedseg_clinic.privacy.secagg_clinic import SecAggClinic
from fedseg_clinic.settings import settings_from_mapping, with_local_steps

DELTA = 1e-5


# ------------------------------------------------------------------- sampler
def test_skellam_sampler_has_the_asked_variance_and_shares_add_up() -> None:
    rng = skellam.noise_rng(seed=7)
    draws = skellam.sample((400_000,), 50.0, rng)
    assert draws.dtype == np.int64
    assert abs(draws.mean()) < 0.05
    assert draws.var() == pytest.approx(50.0, rel=0.01)
    # Three clinics adding mu / 3 each: the sum is Skellam(mu) (same variance, same law).
    shares = sum(skellam.sample((400_000,), 50.0 / 3, rng) for _ in range(3))
    assert shares.var() == pytest.approx(50.0, rel=0.01)
    # Skellam(mu) has P(0) = exp(-mu) I_0(mu); compare with the empirical frequency.
    from scipy.special import ive

    assert np.mean(shares == 0) == pytest.approx(ive(0, 50.0), rel=0.03)
    assert not skellam.sample((5,), 0.0, rng).any()
    with pytest.raises(FedsegError, match="variance"):
        skellam.sample((5,), -1.0, rng)


def test_noise_is_keyed_from_the_os_unless_seeded() -> None:
    a = skellam.sample((64,), 1e6, skellam.noise_rng())
    b = skellam.sample((64,), 1e6, skellam.noise_rng())
    assert not np.array_equal(a, b)
    c = skellam.sample((64,), 1e6, skellam.noise_rng(3))
    d = skellam.sample((64,), 1e6, skellam.noise_rng(3))
    np.testing.assert_array_equal(c, d)


# --------------------------------------------------------------- sensitivity
def test_truncated_patient_gradient_stays_within_the_clip_exactly() -> None:
    rng = np.random.default_rng(0)
    units = skellam.CLIP_UNITS
    for d in (1, 7, 351, 20_000):
        g = rng.normal(size=d).astype(np.float32)
        g *= np.float32(1.0000001) / np.linalg.norm(g)  # float32 clip a hair above C
        r = skellam.truncate_to_units(g, 1.0)
        assert int(np.dot(r, r)) <= units ** 2
        # Truncation toward zero: never larger than the exact scaled value.
        assert np.all(np.abs(r) <= np.abs(g.astype(np.float64) * units) + 1e-9)
    # C != 1: the scale is units / C.
    r = skellam.truncate_to_units(np.array([0.0, -3.0, 4.0]), 5.0)
    np.testing.assert_array_equal(r, [0, -(3 * units // 5), 4 * units // 5])  # toward 0


def test_sensitivity_of_the_clinic_sum_by_hand() -> None:
    """Adding one patient (any gradient, clipped to C) moves the integer sum by at most
    D2 = CLIP_UNITS in l2 and D1 = CLIP_UNITS^2 in l1 (module doc of skellam.py)."""
    rng = np.random.default_rng(1)
    d, clip = 50, 0.5
    patients = [rng.normal(size=d) for _ in range(6)]
    clipped = [g * min(1.0, clip / np.linalg.norm(g)) for g in patients]
    zero = skellam.noise_rng(0)
    without = noised_sum(clipped[:-1], d, clip, 0.0, zero)
    with_all = noised_sum(clipped, d, clip, 0.0, zero)
    diff = (with_all - without).astype(np.float64)
    d2, d1 = skellam.sensitivities()
    assert np.linalg.norm(diff) <= d2
    assert np.abs(diff).sum() <= d1
    # By hand: the difference is exactly the last patient's truncated integer vector.
    np.testing.assert_array_equal(with_all - without,
                                  np.trunc(clipped[-1] * (skellam.CLIP_UNITS / clip)))
    assert (d2, d1) == (2.0 ** 20, 2.0 ** 40)


# --------------------------------------------------------------- accounting
def test_skellam_rdp_matches_agarwal_et_al_by_hand() -> None:
    seg = skellam.SkellamSegment(variance=400.0, l2_sensitivity=3.0, l1_sensitivity=9.0,
                                 steps=2)
    a = 5
    hand = 2 * (a * 9 / 800 + min((9 * 9 + 54) / (4 * 400 ** 2), 27 / 800))
    assert skellam.rdp(seg, orders=[a])[0] == pytest.approx(hand, rel=1e-12)


@pytest.mark.parametrize("z", [0.8, 2.0, 6.0])
def test_skellam_epsilon_tends_to_dp_accountings_gaussian(z: float) -> None:
    rounds = 40
    accountant = rdp_privacy_accountant.RdpAccountant(orders=skellam.ORDERS)
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z),
                                                         rounds))
    gaussian = accountant.get_epsilon(DELTA)
    large = skellam.epsilon([skellam.segment_for(z, rounds)], DELTA)  # mu = (z 2^20)^2
    small = skellam.epsilon([skellam.segment_for(z, rounds, clip_units=4)], DELTA)
    assert large == pytest.approx(gaussian, rel=1e-6)
    assert small > gaussian * 1.001  # the discreteness price is real at small variance


def test_calibration_meets_the_target_tightly() -> None:
    z = skellam.calibrate(12, 4.0, DELTA)
    assert skellam.epsilon([skellam.segment_for(z, 12)], DELTA) <= 4.0
    assert skellam.epsilon([skellam.segment_for(z - 2e-3, 12)], DELTA) > 4.0


def test_history_composes_dp_sgd_rounds_with_distributed_rounds() -> None:
    gauss = [PrivacySegment(0.1, 1.1, 30)]
    dist = [skellam.segment_for(1.5, 4)]
    report = compute_epsilon_history([*gauss, *dist], DELTA)
    accountant = rdp_privacy_accountant.RdpAccountant(orders=skellam.ORDERS)
    accountant.compose(dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.1)), 30),
        dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.5), 4)]))
    assert report.epsilon == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-6)
    assert report.epsilon_pld == math.inf and report.epsilon == report.epsilon_rdp
    assert report.steps == 34
    # Gaussian-only histories are unchanged (tighter of RDP and PLD).
    assert compute_epsilon_history(gauss, DELTA).epsilon_pld < math.inf


def test_full_batch_dp_gd_is_the_gaussian_mechanism_composed() -> None:
    """training.full_batch: B = N, q = 1, no amplification by sampling."""
    settings = settings_from_mapping({"training": {"full_batch": True, "batch_size": 4,
                                                   "local_steps": 5}}, "test")
    resolved = with_local_steps(settings, 37)
    assert resolved.training.batch_size == 37 and resolved.training.local_steps == 5
    report = compute_epsilon(37, 37, 50, 3.0, 1e-3)
    assert report.sampling_probability == 1.0
    rdp = rdp_privacy_accountant.RdpAccountant()
    rdp.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(3.0), 50))
    assert report.epsilon_rdp == pytest.approx(rdp.get_epsilon(1e-3), rel=1e-9)
    from dp_accounting.pld import pld_privacy_accountant

    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(3.0), 50))
    assert report.epsilon_pld == pytest.approx(pld.get_epsilon(1e-3), rel=1e-6)
    # Subsampling would have been cheaper at the same sigma: q = 1 is the honest price.
    assert compute_epsilon(37, 4, 50, 3.0, 1e-3).epsilon < report.epsilon
    sigma = calibrate_noise(37, 37, 50, 8.0, 1e-3)
    assert compute_epsilon(37, 37, 50, sigma, 1e-3).epsilon <= 8.0


def test_distributed_settings_resolve_to_one_full_batch_step() -> None:
    settings = settings_from_mapping({"privacy": {"distributed": True},
                                      "training": {"local_steps": 9}}, "test")
    t = with_local_steps(settings, 20).training
    assert (t.local_steps, t.batch_size) == (1, 20)
    with pytest.raises(FedsegError, match=r"distributed needs privacy\.enabled"):
        settings_from_mapping({"privacy": {"distributed": True, "enabled": False}}, "f.yaml")


def test_honest_shares_default_to_the_threshold_and_can_only_go_down() -> None:
    assert [skellam.honest_shares(n) for n in (3, 4, 5, 10)] == [2, 3, 3, 6]
    assert skellam.honest_shares(10, 1) == 1
    assert skellam.honest_shares(3, 3) == 2  # capped: the server unmasks 2 of 3


# -------------------------------------------------------------------- ledger
def test_ledger_records_distributed_rounds_with_mechanism_and_trust(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "p" / "ledger-00000000000000aa.json",
                           "00000000000000aa", DELTA, epsilon_budget=6.0)
    ledger.reserve(LedgerSegment.for_schedule("r1", 50, 5, 10, 1.2, 1.0), client="c")
    z = 1.4
    for k in (2, 3):
        ledger.reserve(LedgerSegment.for_distributed(f"r{k}", 50, z, 1.0, 2, 3), client="c")
    entries = ledger.entries()
    assert "mechanism" not in entries[0]  # DP-SGD entries keep their layout
    assert entries[1]["mechanism"] == "skellam"
    assert entries[1]["skellam"]["honest_shares"] == 2
    assert entries[1]["skellam"]["share_variance"] == entries[1]["skellam"]["variance"] / 2
    spent = ledger.spent().epsilon
    expected = compute_epsilon_history([PrivacySegment(0.1, 1.2, 10),
                                        skellam.segment_for(z, 2)], DELTA).epsilon
    assert spent == pytest.approx(expected, rel=1e-12)
    alone = ledger.spent_alone().epsilon
    assert alone > spent
    assert alone == pytest.approx(compute_epsilon_history(
        [PrivacySegment(0.1, 1.2, 10), skellam.segment_for(z / math.sqrt(2), 2)],
        DELTA).epsilon, rel=1e-9)
    # The budget holds for distributed rounds too.
    from fedseg_clinic.privacy.ledger import BudgetExceededError

    with pytest.raises(BudgetExceededError):
        for k in range(4, 40):
            ledger.reserve(LedgerSegment.for_distributed(f"r{k}", 50, z, 1.0, 2, 3))
    # A tampered variance breaks the chain.
    data = json.loads(ledger.path.read_text())
    data["entries"][1]["skellam"]["variance"] *= 4
    ledger.path.write_text(json.dumps(data))
    with pytest.raises(FedsegError, match="fails its hash check"):
        ledger.entries()


def test_budget_plan_and_calibration_cover_the_distributed_mode(tmp_path: Path) -> None:
    from fedseg.orchestration.phantoms import generate_benchmark, preset_spec
    from fedseg_clinic.privacy.budget import plan_rounds, resolve_noise, training_patients

    out = tmp_path / "bench"
    generate_benchmark(preset_spec("iid", clinics=1, patients=6, size=24, seed=1), out)
    data = out / "clinic-1"
    settings = settings_from_mapping({
        "data_dir": str(data), "client_name": "clinic-1",
        "privacy": {"distributed": True, "target_epsilon": 3.0, "planned_rounds": 3},
    }, "test")
    n = len(training_patients(data))
    z, budget = resolve_noise(n, settings)
    assert budget == 3.0
    assert z == pytest.approx(skellam.calibrate(3, 3.0, 1 / (10 * n)))
    plan = plan_rounds(settings, [{}, {}, {}, {}])
    assert plan.affordable_rounds == 3 and "round 4" in plan.reason
    assert plan.epsilon_after == pytest.approx(
        skellam.epsilon([skellam.segment_for(z, 3)], 1 / (10 * n)), rel=1e-9)
    assert 2.9 < plan.epsilon_after <= 3.0


def test_calibrate_cli_distributed_reports_the_trust_line() -> None:
    result = CliRunner().invoke(cli, ["privacy", "calibrate", "--patients", "45", "--rounds",
                                      "10", "--delta", "1e-3", "--epsilon", "8",
                                      "--distributed", "--clinics", "3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["epsilon"] <= 8.0 and report["honest_shares"] == 2
    assert report["epsilon_if_alone"] > 8.0 > report["epsilon_all_honest"]
    assert "at least 2 honest noise shares" in report["trust"]
    # At equal epsilon the aggregate carries less noise than with local DP-GD.
    assert report["distributed_aggregate_std"] < report["local_aggregate_std"]
    bad = CliRunner().invoke(cli, ["privacy", "calibrate", "--patients", "45", "--rounds",
                                   "10", "--delta", "1e-3", "--epsilon", "8"])
    assert bad.exit_code == 1 and "--batch" in bad.output
    full = CliRunner().invoke(cli, ["privacy", "calibrate", "--patients", "45", "--rounds",
                                    "10", "--local-steps", "1", "--full-batch", "--delta",
                                    "1e-3", "--epsilon", "8", "--json"])
    assert full.exit_code == 0 and json.loads(full.output)["sampling_probability"] == 1.0


# ------------------------------------------------------------------ protocol
SHAPES = [(3, 4), (5,)]


class _Contributor:
    """A clinic whose distributed contribution is fixed integers (sum + noise share)."""

    def __init__(self, seed: int, n: int) -> None:
        rng = np.random.default_rng(seed)
        self.values = [rng.integers(-2 ** 30, 2 ** 30, size=s, dtype=np.int64)
                       for s in SHAPES]
        self.n = n
        self.calls = 0

    def contribute(self, clinics: int) -> tuple[list[np.ndarray], dict[str, Any]]:
        self.calls += 1
        assert clinics == 3
        return [v.copy() for v in self.values], {"num_examples": self.n, "ddp_scale": 2.0 ** 20,
                                                 "learning_rate": 0.5}


def _round(server: SecAggServer, clinics: dict[str, SecAggClinic], toys: dict[str, Any],
           model: list[np.ndarray], answering: set[str]) -> list[np.ndarray]:
    settings = server.client_settings()
    updates = {}
    for cid in sorted(answering):
        def train() -> Any:
            raise AssertionError("a distributed clinic never trains")
        out, meta = clinics[cid].handle(settings["secagg"], model, train,
                                        toys[cid].contribute)
        updates[cid] = [out, meta]
    return server.aggregate(model, updates)


def test_masked_sum_of_noised_integers_equals_the_plain_sum_and_one_dp_gd_step(
        tmp_path: Path) -> None:
    ids = ["c0", "c1", "c2"]
    server = SecAggServer("sess", [{}], tmp_path / "journal.jsonl")
    clinics = {c: SecAggClinic(c) for c in ids}
    toys = {c: _Contributor(i, 10 * (i + 1)) for i, c in enumerate(ids)}
    model = [np.zeros(s, np.float32) for s in SHAPES]
    assert all(np.array_equal(a, b) for a, b in
               zip(_round(server, clinics, toys, model, set(ids)), model, strict=True))
    new = _round(server, clinics, toys, model, set(ids))
    total_n = 60
    for i, w in enumerate(new):
        plain = sum(t.values[i] for t in toys.values())  # int64, exact
        expected = -0.5 * plain.astype(np.float64) / (2.0 ** 20 * total_n)
        np.testing.assert_allclose(w, expected.astype(np.float32), rtol=1e-6)
    journal = [json.loads(line) for line in (tmp_path / "journal.jsonl").read_text().splitlines()]
    assert journal[-1]["status"] == "ok" and journal[-1]["dp_mode"] == "distributed"


def test_server_refuses_a_round_mixing_distributed_and_plain_clinics(tmp_path: Path) -> None:
    ids = ["c0", "c1", "c2"]
    server = SecAggServer("sess", [{}], tmp_path / "journal.jsonl")
    clinics = {c: SecAggClinic(c) for c in ids}
    toys = {c: _Contributor(i, 10) for i, c in enumerate(ids)}
    model = [np.ones(s, np.float32) for s in SHAPES]
    _round(server, clinics, toys, model, set(ids))
    settings = server.client_settings()
    updates = {}
    for cid in ids:
        contribute = toys[cid].contribute if cid != "c2" else None
        out, meta = clinics[cid].handle(
            settings["secagg"], model,
            lambda: ([w + 1 for w in model], {"num_examples": 10}), contribute)
        updates[cid] = [out, meta]
    new = server.aggregate(model, updates)
    assert all(np.array_equal(a, b) for a, b in zip(new, model, strict=True))
    last = json.loads((tmp_path / "journal.jsonl").read_text().splitlines()[-1])
    assert last["status"] == "failed" and "same privacy.distributed" in last["reason"]


def test_experiment_refuses_distributed_dp_without_secure_aggregation(tmp_path: Path) -> None:
    import yaml

    from fedseg.orchestration.experiment import load_experiment

    doc = {"name": "x", "data": {"phantoms": {"clinics": 3}},
           "clinic": {"privacy": {"distributed": True}}}
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(FedsegError, match=r"needs session\.secure_aggregation: true") as info:
        load_experiment(path)
    assert "\n" not in str(info.value)
    doc["session"] = {"secure_aggregation": True, "rounds": 4}
    doc["clinic"]["privacy"]["target_epsilon"] = 8.0
    path.write_text(yaml.safe_dump(doc))
    exp = load_experiment(path)
    assert exp.clinic["privacy"]["planned_rounds"] == 3  # round 1 only exchanges keys
