from __future__ import annotations

import math

import numpy as np
import pytest

from fedseg_clinic.model.losses import PROB_FLOOR, merge_unknown, per_example_loss
from fedseg_clinic.model.unet import UNetConfig, build_unet, class_known
from fedseg_clinic.tf_env import tf

BG, BODY, LUNG_L, LUNG_R, HEART, CORD, ESO = range(7)


def probs_of(*voxels: dict[int, float]) -> np.ndarray:
    """(1, 1, 1, n, 7) probabilities from per-voxel {class: p} dicts."""
    out = np.zeros((1, 1, 1, len(voxels), 7), dtype=np.float32)
    for i, voxel in enumerate(voxels):
        for cls, p in voxel.items():
            out[0, 0, 0, i, cls] = p
    return out


def labels_of(*classes: int) -> np.ndarray:
    return np.array(classes, dtype=np.int32).reshape(1, 1, 1, -1)


def known_of(*organs: str) -> np.ndarray:
    return class_known(organs)[None]


def loss_value(labels: np.ndarray, probs: np.ndarray, known: np.ndarray) -> float:
    out = per_example_loss(labels, probs, known).numpy()
    assert out.shape == (1,)
    return float(out[0])


def test_unknown_organ_predicted_on_body_costs_nothing() -> None:
    labels = labels_of(BODY, BODY)
    probs = probs_of({HEART: 1.0}, {BODY: 1.0})  # heart is not contoured by this clinic
    assert loss_value(labels, probs, known_of("body")) == pytest.approx(0.0, abs=1e-6)
    # The same prediction is penalised when the clinic does contour the heart.
    assert loss_value(labels, probs, known_of("body", "heart")) > 1.0


def test_known_organ_predicted_as_body_is_penalised() -> None:
    labels = labels_of(HEART, BODY)
    probs = probs_of({BODY: 1.0}, {BODY: 1.0})
    # CE: (-log(floor) + 0) / 2. Dice body: 1 - 2*1/(2+1) = 1/3; heart: 1 - 0/1 = 1.
    expected_ce = -math.log(PROB_FLOOR) / 2
    expected_dice = (1 / 3 + 1.0) / 2
    value = loss_value(labels, probs, known_of("body", "heart"))
    assert value == pytest.approx(expected_ce + expected_dice, rel=1e-4)


def test_body_unknown_merges_into_background() -> None:
    # Known: background and lung_left only. Voxel 0 is background (body, heart unknown);
    # voxel 1 is lung_left with 0.4 on (unknown) body.
    labels = labels_of(BG, LUNG_L)
    probs = probs_of({BG: 0.2, BODY: 0.5, HEART: 0.3}, {LUNG_L: 0.6, BODY: 0.4})
    # Merged: voxel 0 bg = 1.0; voxel 1 lung_left 0.6, bg 0.4.
    expected_ce = (0.0 - math.log(0.6)) / 2
    expected_dice = 1 - (2 * 0.6) / (0.6 + 1.0)  # only lung_left is known foreground
    value = loss_value(labels, probs, known_of("lung_left"))
    assert value == pytest.approx(expected_ce + expected_dice, rel=1e-4)


def test_merge_unknown_maps_labels_and_probabilities() -> None:
    labels = labels_of(HEART, ESO)  # heart labelled although unknown: merged into body
    probs = probs_of({HEART: 0.7, BODY: 0.3}, {ESO: 0.5, CORD: 0.5})
    merged_labels, merged_probs = merge_unknown(labels, probs, known_of("body", "esophagus"))
    np.testing.assert_allclose(merged_labels.numpy()[0, 0, 0],
                               [[0, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1]])
    np.testing.assert_allclose(merged_probs.numpy()[0, 0, 0],
                               [[0, 1.0, 0, 0, 0, 0, 0], [0, 0.5, 0, 0, 0, 0, 0.5]], atol=1e-6)


@pytest.mark.parametrize(
    ("probs", "expected"),
    [
        # Empty heart mask, heart not predicted: Dice term smooth/smooth = 1 -> loss 0.
        (probs_of({BG: 1.0}, {BG: 1.0}), 0.0),
        # Empty heart mask but heart predicted on voxel 1: CE -log(0.5)/2, Dice ~ 1.
        (probs_of({BG: 1.0}, {BG: 0.5, HEART: 0.5}), -math.log(0.5) / 2 + 1.0),
    ],
)
def test_empty_masks(probs: np.ndarray, expected: float) -> None:
    labels = labels_of(BG, BG)
    assert loss_value(labels, probs, known_of("heart")) == pytest.approx(expected, abs=1e-4)


def test_only_background_known_has_no_dice_term() -> None:
    labels = labels_of(BG, BG)
    probs = probs_of({BG: 0.5, BODY: 0.5}, {HEART: 1.0})
    # Everything unknown merges into background: probability 1 everywhere.
    assert loss_value(labels, probs, known_of()) == pytest.approx(0.0, abs=1e-6)


def test_loss_is_per_example() -> None:
    labels = np.concatenate([labels_of(HEART, BODY), labels_of(BG, LUNG_L)])
    probs = np.concatenate([
        probs_of({BODY: 1.0}, {BODY: 1.0}),
        probs_of({BG: 0.2, BODY: 0.5, HEART: 0.3}, {LUNG_L: 0.6, BODY: 0.4}),
    ])
    known = np.concatenate([known_of("body", "heart"), known_of("lung_left")])
    batch = per_example_loss(labels, probs, known).numpy()
    assert batch.shape == (2,)
    for i in range(2):
        single = per_example_loss(labels[i:i + 1], probs[i:i + 1], known[i:i + 1]).numpy()
        assert batch[i] == pytest.approx(single[0], rel=1e-6)


def test_gradient_through_model_is_finite() -> None:
    model = build_unet(UNetConfig(levels=2, base_filters=4), seed=0)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1, 8, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 2, (1, 8, 8, 8)).astype(np.int32)
    with tf.GradientTape() as tape:
        loss = per_example_loss(labels, model(x, training=True), known_of("body"))
    grads = tape.gradient(loss, model.trainable_variables)
    assert float(loss[0]) > 0.0
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)
    assert any(np.abs(g.numpy()).max() > 0 for g in grads)


def test_loss_invariant_to_shuffling_mass_among_unknown_and_merge_classes() -> None:
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(7), size=(1, 2, 3, 4)).astype(np.float32)
    labels = rng.choice([BG, BODY, HEART], size=(1, 2, 3, 4)).astype(np.int32)
    known = known_of("body", "heart")
    shuffled = probs.copy()
    moved = [BODY, LUNG_L, LUNG_R, CORD, ESO]  # body (merge class) + the unknown organs
    shuffled[..., moved] = rng.permutation(probs[..., moved], axis=-1)
    a = per_example_loss(labels, probs, known).numpy()
    b = per_example_loss(labels, shuffled, known).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-5)
    # ...but not to moving mass into a known organ.
    shuffled[..., [BODY, HEART]] = probs[..., [HEART, BODY]]
    assert abs(per_example_loss(labels, shuffled, known).numpy()[0] - a[0]) > 1e-3


def test_dice_classes_present_leaves_absent_organs_to_cross_entropy() -> None:
    # Heart and esophagus known; only the heart is in the patch, and the model puts 0.5
    # of voxel 1 on the (absent) esophagus.
    labels = labels_of(HEART, BG)
    probs = probs_of({HEART: 1.0}, {BG: 0.5, ESO: 0.5})
    known = known_of("heart", "esophagus")
    ce = -math.log(0.5) / 2
    heart_dice_loss = 1 - 2 * 1.0 / (1.0 + 1.0)  # 0: the heart is right
    # "known": the absent esophagus costs a whole Dice point (mean over two classes).
    default = float(per_example_loss(labels, probs, known).numpy()[0])
    assert default == pytest.approx(ce + (heart_dice_loss + 1.0) / 2, abs=1e-4)
    # "present": only the heart's Dice counts; the esophagus mass pays CE only.
    present = float(per_example_loss(labels, probs, known, dice_classes="present")
                    .numpy()[0])
    assert present == pytest.approx(ce + heart_dice_loss, abs=1e-4)
    # A patch with no known organ in it: cross-entropy alone.
    empty = float(per_example_loss(labels_of(BG, BG), probs_of({BG: 1.0}, {BG: 0.5, ESO: 0.5}),
                                   known, dice_classes="present").numpy()[0])
    assert empty == pytest.approx(ce, abs=1e-4)
    with pytest.raises(ValueError, match="dice_classes"):
        per_example_loss(labels, probs, known, dice_classes="all")


def test_dice_classes_setting_is_checked_and_reaches_the_loss() -> None:
    from fedseg_clinic.errors import FedsegError
    from fedseg_clinic.model.losses import loss_for
    from fedseg_clinic.organs import organ_set
    from fedseg_clinic.settings import ClinicSettings, TrainingSettings, validate_settings

    with pytest.raises(FedsegError, match="dice_classes"):
        validate_settings(ClinicSettings(training=TrainingSettings(dice_classes="some")),
                          "test")
    loss = loss_for(organ_set("thorax"), "present")
    labels = labels_of(HEART, BG)
    probs = probs_of({HEART: 1.0}, {BG: 0.5, ESO: 0.5})
    value = float(loss(labels, probs, known_of("heart", "esophagus")).numpy()[0])
    assert value == pytest.approx(-math.log(0.5) / 2, abs=1e-4)
