"""Membership inference: ROC metrics by hand, offline LiRA scores, a real attack run."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedseg.analysis.leakage import membership as mi


@pytest.mark.parametrize("scores,member,auc", [
    ([4.0, 3.0, 2.0, 1.0], [True, True, False, False], 1.0),
    ([1.0, 2.0, 3.0, 4.0], [True, True, False, False], 0.0),
    ([1.0, 3.0, 2.0, 4.0], [True, True, False, False], 0.25),
    ([1.0, 1.0, 1.0, 1.0], [True, False, True, False], 0.5),
])
def test_auc_by_hand(scores, member, auc: float) -> None:
    assert mi.roc_metrics(np.array(scores), np.array(member))["auc"] == pytest.approx(auc)


def test_tpr_at_low_fpr_by_hand() -> None:
    # 1000 non-members at 0..999, members at 999.5 (one) and 500.5 (one).
    scores = np.concatenate([np.arange(1000.0), [999.5, 500.5]])
    member = np.concatenate([np.zeros(1000, bool), [True, True]])
    result = mi.roc_metrics(scores, member)
    assert result["tpr_at_0.001_fpr"] == 0.5  # threshold 999.5: FPR 0, TPR 1/2
    assert result["tpr_at_0.01_fpr"] == 0.5  # the 2nd member needs FPR ~0.5


def test_roc_needs_both_classes() -> None:
    with pytest.raises(mi.FedsegError, match="members and non-members"):
        mi.roc_metrics(np.array([1.0, 2.0]), np.array([True, True]))


def test_lira_scores_order_by_tail() -> None:
    shadow = np.array([[0.0, 0.0], [1.0, 1.0], [-1.0, -1.0]])  # mu 0, sd 1 per example
    scores = mi.lira_offline_scores(np.array([2.0, -2.0]), shadow)
    assert scores[0] > scores[1]
    assert scores[0] == pytest.approx(-math.log(0.0227501), rel=1e-4)


def test_confidence_statistic_hand_value() -> None:
    probs = np.zeros((1, 1, 1, 2, 7))
    probs[..., 0] = 0.75
    probs[..., 1] = 0.25
    labels = np.zeros((1, 1, 1, 2), np.int64)
    assert mi.confidence_statistic(probs, labels)[0] == pytest.approx(math.log(3.0))


@pytest.mark.slow
def test_non_private_model_leaks_membership() -> None:
    result = mi.run_membership(mi.MembershipConfig(n_targets=16, n_shadow=3))
    assert result["loss_threshold"]["auc"] > 0.7
    assert result["lira_offline"]["auc"] > 0.7


@pytest.mark.slow
def test_membership_reports_phase_timings_with_adam() -> None:
    config = mi.MembershipConfig(n_targets=4, n_shadow=1, steps=2, batch_size=1,
                                 learning_rate=0.01, groups=4, optimizer="adam")
    result = mi.run_membership(config)
    timings = result["timings"]
    assert set(timings) == {"target", "shadows", "first_steps", "steps"}
    # two models, each with one traced first step and one further step
    assert 0 < timings["steps"] < timings["first_steps"] + timings["steps"] \
        <= timings["target"] + timings["shadows"]
    assert 0.0 <= result["lira_offline"]["auc"] <= 1.0
