"""Privacy accounting: dp_accounting RDP/PLD, cross-checked with TF Privacy's own library."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.privacy import accounting
from fedseg_clinic.privacy.accounting import (
    CALIBRATION_TOL,
    PrivacySegment,
    calibrate_noise,
    compute_epsilon,
    compute_epsilon_history,
)
from fedseg_clinic.tf_env import tf  # noqa: F401  (sets TF Privacy's import flags first)


def test_known_schedule_matches_tf_stack_notes() -> None:
    # N=200, batch 4, 50 epochs (2500 steps), sigma 1.1, delta 1e-3: RDP 4.29, PLD 3.77.
    report = compute_epsilon(200, 4, 2500, 1.1, 1e-3)
    assert report.epsilon_rdp == pytest.approx(4.29, abs=0.005)
    assert report.epsilon_pld == pytest.approx(3.77, abs=0.005)
    assert report.epsilon == report.epsilon_pld
    assert report.sampling_probability == pytest.approx(0.02)
    assert report.steps == 2500
    assert report.noise_multiplier == 1.1
    assert report.delta == 1e-3


@pytest.mark.parametrize(("n", "batch", "epochs", "sigma", "delta"), [
    (200, 4, 50, 1.1, 1e-3),
    (1000, 10, 5, 0.8, 1e-4),
    (60, 3, 20, 2.0, 1e-2),
])
def test_rdp_matches_tf_privacy_statement(
    n: int, batch: int, epochs: int, sigma: float, delta: float
) -> None:
    from tensorflow_privacy.privacy.analysis import compute_dp_sgd_privacy_lib as lib

    q = batch / n
    steps = math.ceil(epochs / q)  # TF Privacy's own count of Poisson steps
    # Per-example clipping = microbatches of one: no microbatching sensitivity factor.
    expected = lib._compute_dp_sgd_example_privacy(
        epochs, sigma, delta, used_microbatching=False, poisson_subsampling_probability=q)
    statement = lib.compute_dp_sgd_privacy_statement(
        n, batch, epochs, sigma, delta, used_microbatching=False)
    printed = float(re.search(r"Poisson sampling \(\*\):\s+([0-9.]+)", statement).group(1))
    report = compute_epsilon(n, batch, steps, sigma, delta)
    assert report.epsilon_rdp == pytest.approx(expected, rel=1e-9)
    assert report.epsilon_rdp == pytest.approx(printed, abs=1e-3)
    assert report.epsilon_pld <= report.epsilon_rdp


def test_zero_noise_is_infinite_and_zero_steps_is_free() -> None:
    assert compute_epsilon(100, 5, 10, 0.0, 1e-3).epsilon == math.inf
    free = compute_epsilon(100, 5, 0, 1.0, 1e-3)
    assert (free.epsilon_rdp, free.epsilon_pld, free.epsilon) == (0.0, 0.0, 0.0)


def test_epsilon_grows_with_steps_and_shrinks_with_noise() -> None:
    base = compute_epsilon(100, 5, 100, 1.0, 1e-3).epsilon
    assert compute_epsilon(100, 5, 200, 1.0, 1e-3).epsilon > base
    assert compute_epsilon(100, 5, 100, 2.0, 1e-3).epsilon < base


def test_history_of_equal_rounds_equals_one_schedule() -> None:
    one = compute_epsilon(200, 4, 300, 1.1, 1e-3)
    rounds = compute_epsilon_history([(0.02, 1.1, 100)] * 3, 1e-3)
    assert rounds.epsilon_rdp == pytest.approx(one.epsilon_rdp, rel=1e-12)
    assert rounds.epsilon_pld == pytest.approx(one.epsilon_pld, rel=1e-9)
    assert rounds.steps == 300
    assert rounds.sampling_probability == pytest.approx(0.02)
    assert rounds.noise_multiplier == 1.1


def test_heterogeneous_history_composes() -> None:
    first = [PrivacySegment(0.02, 1.1, 200)]
    both = [*first, PrivacySegment(0.05, 0.9, 50)]
    a = compute_epsilon_history(first, 1e-3)
    b = compute_epsilon_history(both, 1e-3)
    assert b.epsilon > a.epsilon
    assert b.epsilon_rdp > a.epsilon_rdp
    assert b.steps == 250
    assert b.sampling_probability is None and b.noise_multiplier is None


def test_empty_history_and_zero_step_segments_cost_nothing() -> None:
    assert compute_epsilon_history([], 1e-3).epsilon == 0.0
    assert compute_epsilon_history([(0.1, 0.0, 0)], 1e-3).epsilon == 0.0
    assert compute_epsilon_history([(0.1, 0.0, 3)], 1e-3).epsilon == math.inf


def test_calibrate_rdp_matches_tf_stack_notes() -> None:
    sigma = calibrate_noise(200, 4, 2500, 8.0, 1e-3, accountant="rdp")
    assert sigma == pytest.approx(0.82, abs=0.005)
    assert compute_epsilon(200, 4, 2500, sigma, 1e-3).epsilon_rdp <= 8.0


def test_calibrate_tighter_is_smallest_sigma_within_budget() -> None:
    sigma = calibrate_noise(200, 4, 2500, 8.0, 1e-3)
    assert sigma < 0.82  # PLD is tighter, so less noise suffices
    assert compute_epsilon(200, 4, 2500, sigma, 1e-3).epsilon <= 8.0
    assert compute_epsilon(200, 4, 2500, sigma - 2 * CALIBRATION_TOL, 1e-3).epsilon > 8.0


def test_calibrate_zero_steps_needs_no_noise() -> None:
    assert calibrate_noise(10, 2, 0, 1.0, 1e-3) == 0.0


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"delta": 0.01}, "delta=0.01"),          # 1/N = 0.01: refused
    ({"delta": 0.0}, "delta=0.0"),
    ({"batch_size": 101}, "exceeds"),
    ({"batch_size": 0}, "B=0"),
    ({"steps": -1}, "steps=-1"),
    ({"noise_multiplier": -0.5}, "sigma=-0.5"),
    ({"n_patients": 0, "batch_size": 0}, "N=0"),
])
def test_compute_epsilon_refuses_bad_values(kwargs: dict, fragment: str) -> None:
    args = {"n_patients": 100, "batch_size": 5, "steps": 10, "noise_multiplier": 1.0,
            "delta": 1e-3, **kwargs}
    with pytest.raises(FedsegError, match=re.escape(fragment)):
        compute_epsilon(**args)


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"target_epsilon": 0.0}, "epsilon=0.0"),
    ({"target_epsilon": math.inf}, "epsilon=inf"),
    ({"delta": 0.5}, "delta=0.5"),
    ({"accountant": "moments"}, "moments"),
])
def test_calibrate_refuses_bad_values(kwargs: dict, fragment: str) -> None:
    args = {"n_patients": 100, "batch_size": 5, "steps": 10, "target_epsilon": 1.0,
            "delta": 1e-3, **kwargs}
    with pytest.raises(FedsegError, match=re.escape(fragment)):
        calibrate_noise(**args)


@pytest.mark.parametrize("segment", [(1.5, 1.0, 1), (-0.1, 1.0, 1), (0.1, -1.0, 1),
                                     (0.1, float("nan"), 1), (0.1, 1.0, -2)])
def test_history_refuses_bad_segments(segment: tuple[float, float, int]) -> None:
    with pytest.raises(FedsegError):
        compute_epsilon_history([segment], 1e-3)


def test_history_checks_delta_against_patients() -> None:
    with pytest.raises(FedsegError, match="1/N"):
        compute_epsilon_history([(0.1, 1.0, 1)], 0.05, n_patients=20)


@pytest.mark.slow
def test_calibration_cache_is_reused_verified_and_keyed_by_every_input(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(accounting.CACHE_ENV, str(tmp_path))
    path = accounting.calibration_cache_path()
    assert path is not None and path.parent == tmp_path
    first = calibrate_noise(60, 8, 30, 8.0, 1e-3)
    entries = json.loads(path.read_text())
    assert list(entries.values()) == [first]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".calib-")]  # renamed
    # A second call reads the cache (no search) and the sigma it returns meets the target.
    calls: list[tuple] = []

    def counted(*args: object) -> float:  # every other search: a large, valid sigma
        calls.append(args)
        return 10.0

    monkeypatch.setattr(accounting, "_calibrate", counted)
    assert calibrate_noise(60, 8, 30, 8.0, 1e-3) == first
    assert calls == []
    assert compute_epsilon(60, 8, 30, first, 1e-3).epsilon <= 8.0
    # Any other input is another entry.
    for args in ((60, 8, 30, 8.0, 1e-4), (61, 8, 30, 8.0, 1e-3), (60, 9, 30, 8.0, 1e-3),
                 (60, 8, 31, 8.0, 1e-3), (60, 8, 30, 7.0, 1e-3)):
        assert calibrate_noise(*args) == 10.0
    assert calibrate_noise(60, 8, 30, 8.0, 1e-3, accountant="pld") == 10.0
    assert len(calls) == 6 and len(json.loads(path.read_text())) == 7
    # A cached sigma that does not verify (tampered: too little noise) is recalibrated.
    entries = json.loads(path.read_text())
    key = next(k for k, v in entries.items() if v == first)
    path.write_text(json.dumps({key: first / 2}))
    assert calibrate_noise(60, 8, 30, 8.0, 1e-3) == 10.0
    assert len(calls) == 7
    # A damaged file is ignored.
    path.write_text("{not json")
    assert calibrate_noise(60, 8, 30, 8.0, 1e-3) == 10.0
    assert len(calls) == 8
    monkeypatch.setenv(accounting.CACHE_ENV, "off")
    assert accounting.calibration_cache_path() is None
