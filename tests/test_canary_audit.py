"""One-run privacy audit: the Steinke et al. bound by hand, and on real DP / non-DP runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import fedseg_cli

from fedseg.analysis.leakage import canary as ca


@pytest.mark.parametrize("r,v,expected", [(4, 4, 0.0625), (4, 0, 1.0), (2, 1, 0.75)])
def test_p_value_pure_dp_at_eps_zero(r: int, v: int, expected: float) -> None:
    """epsilon = 0, delta = 0: P[Binomial(r, 1/2) >= v]."""
    assert ca.p_value(10, r, v, 0.0, 0.0) == pytest.approx(expected)


def test_p_value_delta_term_by_hand() -> None:
    # r = 2, v = 2, eps = 0: beta = 1/4; alpha = max(P[B=1]/1, (P[B=1]+P[B=0])/2)
    # = max(1/2, 3/8) = 1/2; p = 1/4 + 1/2 * delta * 2m.
    assert ca.p_value(5, 2, 2, 0.0, 0.01) == pytest.approx(0.25 + 0.5 * 0.01 * 10)


def test_lower_bound_all_correct_matches_closed_form() -> None:
    """16 of 16 correct, delta 0: q^16 = 0.05 -> eps = log(q / (1 - q))."""
    q = 0.05 ** (1 / 16)
    assert ca.epsilon_lower_bound(32, 16, 16, 0.0, 0.95) == pytest.approx(
        math.log(q / (1 - q)), abs=1e-4)


@pytest.mark.parametrize("v", [0, 8, 10])
def test_lower_bound_zero_without_evidence(v: int) -> None:
    assert ca.epsilon_lower_bound(32, 16, v, 1e-5, 0.95) == 0.0


def test_lower_bound_grows_with_correct_guesses() -> None:
    bounds = [ca.epsilon_lower_bound(64, 32, v, 1e-5, 0.95) for v in (24, 28, 32)]
    assert 0 < bounds[0] < bounds[1] < bounds[2]


def test_guess_counts_by_hand() -> None:
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, False, True, False, False, True])
    # top 2: {0 in, 1 out} -> 1 correct; bottom 2: {4 out, 5 in} -> 1 correct.
    assert ca.guess_counts(scores, included, 2, 2) == (4, 2)
    with pytest.raises(ca.FedsegError):
        ca.guess_counts(scores, included, 4, 3)


@pytest.mark.slow
def test_non_private_overfitted_run_has_positive_bound() -> None:
    result = ca.run_canary_audit(ca.CanaryAuditConfig(noise_multiplier=None, seed=0))
    assert result["epsilon"] == math.inf
    assert result["attack_auc"] > 0.9
    assert result["epsilon_lower_bound"] > 0.5


@pytest.mark.slow
def test_dp_run_bound_stays_below_accountant() -> None:
    result = ca.run_canary_audit(ca.CanaryAuditConfig(noise_multiplier=2.0, seed=0))
    assert math.isfinite(result["epsilon"])
    assert 0.0 <= result["epsilon_lower_bound"] <= result["epsilon"]


def test_audit_cli_rejects_bad_noise(tmp_path) -> None:
    result = fedseg_cli(["audit", "--out", str(tmp_path / "o"), "--noise", "none,abc"])
    assert result.exit_code == 1 and "'abc'" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_audit_cli_writes_report(tmp_path) -> None:
    import json

    from fedseg.analysis.leakage import results as lr

    out = tmp_path / "audit"
    result = fedseg_cli(["audit", "--out", str(out), "--noise", "none,1.0", "--canaries", "4",
                   "--steps", "2", "--batch", "2", "--no-membership"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "audit.json").read_text())
    rows = data["rows"]
    assert [r["noise_multiplier"] for r in rows] == ["none", 1.0]
    assert set(lr.AUDIT_ROW_KEYS) <= set(rows[0]) and rows[1]["confidence"] == 0.95
    assert set(data["runs"][0]["canary_audit"]["timings"]) == {
        "records", "model", "first_step", "steps", "score_and_bound"}
    assert rows[0]["epsilon_accountant"] == "inf"
    assert 0 < rows[1]["epsilon_accountant"] < 1e6
    assert (out / "audit.png").exists() and (out / "report.html").exists()


@pytest.mark.slow
def test_audit_of_the_demo_model_with_adam() -> None:
    """The demo's U-Net (levels 3, base 8, groups 4) and optimiser (Adam) run in the
    audit; a few steps only, so the accountant's epsilon is small and the bound 0."""
    config = ca.CanaryAuditConfig(n_canaries=4, n_patients=2, noise_multiplier=0.8,
                                  batch_size=2, steps=3, learning_rate=0.01, levels=3,
                                  base_filters=8, groups=4, optimizer="adam", patch=8)
    result = ca.run_canary_audit(config)
    assert result["config"]["optimizer"] == "adam" and result["config"]["groups"] == 4
    assert 0.0 == result["epsilon_lower_bound"] < result["epsilon"] < math.inf
    assert result["timings"]["steps"] > 0 and len(result["scores"]) == 4
