from __future__ import annotations

import math

import numpy as np
import pytest

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.model.metrics import dice, hd95, organ_metrics
from fedseg_clinic.organs import ORGANS


def row(*values: int) -> np.ndarray:
    return np.array(values, dtype=bool).reshape(1, 1, -1)


def voxels(shape: tuple[int, int, int], *points: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for p in points:
        mask[p] = True
    return mask


@pytest.mark.parametrize(
    ("pred", "truth", "expected"),
    [
        (row(0, 0, 0, 0), row(0, 0, 0, 0), math.nan),
        (row(1, 0, 0, 0), row(0, 0, 0, 0), 0.0),
        (row(0, 0, 0, 0), row(0, 1, 1, 0), 0.0),
        (row(1, 1, 0, 0), row(1, 1, 0, 0), 1.0),
        (row(1, 1, 0, 0), row(0, 1, 1, 0), 0.5),
        (row(1, 1, 1, 1), row(1, 0, 0, 0), 2 / 5),
        (row(1, 0, 0, 0), row(0, 0, 0, 1), 0.0),
    ],
)
def test_dice(pred: np.ndarray, truth: np.ndarray, expected: float) -> None:
    value = dice(pred, truth)
    if math.isnan(expected):
        assert math.isnan(value)
    else:
        assert value == pytest.approx(expected)


def test_dice_shape_mismatch() -> None:
    with pytest.raises(FedsegError, match="shape"):
        dice(row(1, 0), row(1, 0, 0))


def _solid_cube(size: int, inner: int) -> np.ndarray:
    mask = np.zeros((size,) * 3, dtype=bool)
    start = (size - inner) // 2
    mask[start:start + inner, start:start + inner, start:start + inner] = True
    return mask


@pytest.mark.parametrize(
    ("pred", "truth", "spacing", "expected"),
    [
        # Single voxels 3 apart along x at 0.5 mm: 1.5 mm.
        (voxels((3, 3, 5), (1, 1, 0)), voxels((3, 3, 5), (1, 1, 3)), (2.0, 1.0, 0.5), 1.5),
        # 2 apart along z at 2 mm: 4 mm.
        (voxels((5, 3, 3), (0, 1, 1)), voxels((5, 3, 3), (2, 1, 1)), (2.0, 1.0, 0.5), 4.0),
        # Diagonal (1, 1, 1) steps at (2, 1, 0.5) mm: sqrt(4 + 1 + 0.25).
        (voxels((3, 3, 3), (0, 0, 0)), voxels((3, 3, 3), (1, 1, 1)), (2.0, 1.0, 0.5),
         math.sqrt(5.25)),
        # Truth has a second voxel 4 away: directed distances {0, 4}, 95th pct 3.8.
        (voxels((1, 1, 5), (0, 0, 0)), voxels((1, 1, 5), (0, 0, 0), (0, 0, 4)),
         (1.0, 1.0, 1.0), 3.8),
        # Identical masks: 0.
        (_solid_cube(7, 5), _solid_cube(7, 5), (1.0, 1.0, 1.0), 0.0),
        # 5^3 cube vs its centred 3^3 core: shell distances 54x1, 36x sqrt2, 8x sqrt3
        # (surfaces only: the core's centre voxel is not surface); 95th pct is sqrt3.
        (_solid_cube(7, 5), _solid_cube(7, 3), (1.0, 1.0, 1.0), math.sqrt(3)),
    ],
)
def test_hd95_hand_computed(pred: np.ndarray, truth: np.ndarray, spacing: tuple,
                            expected: float) -> None:
    assert hd95(pred, truth, spacing) == pytest.approx(expected, rel=1e-6)
    assert hd95(truth, pred, spacing) == pytest.approx(expected, rel=1e-6)  # symmetric


@pytest.mark.parametrize(
    ("pred_empty", "truth_empty", "check"),
    [
        (True, True, math.isnan),
        (True, False, math.isinf),
        (False, True, math.isinf),
    ],
)
def test_hd95_empty_masks(pred_empty: bool, truth_empty: bool, check) -> None:
    full = voxels((3, 3, 3), (1, 1, 1))
    empty = np.zeros((3, 3, 3), dtype=bool)
    value = hd95(empty if pred_empty else full, empty if truth_empty else full, (1, 1, 1))
    assert check(value)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -1.0, 1.0)])
def test_hd95_bad_spacing(spacing: tuple) -> None:
    mask = voxels((3, 3, 3), (1, 1, 1))
    with pytest.raises(FedsegError, match="spacing"):
        hd95(mask, mask, spacing)


def test_organ_metrics_keys_nan_for_unlabelled_and_mean() -> None:
    shape = (1, 2, 4)
    body = np.ones(shape, dtype=bool)
    heart = voxels(shape, (0, 0, 0), (0, 0, 1))
    lung_left = np.zeros(shape, dtype=bool)  # labelled, truly absent
    pred = np.array([[[4, 1, 0, 1], [1, 1, 1, 1]]], dtype=np.uint8)  # heart only at (0,0,0)
    result = organ_metrics(
        pred, {"body": body, "heart": heart, "lung_left": lung_left},
        ["body", "heart", "lung_left"], (1.0, 1.0, 1.0),
    )
    expected_keys = {f"val_{m}_{o}" for m in ("dice", "hd95") for o in ORGANS}
    assert set(result) == expected_keys | {"val_dice_mean"}
    assert result["val_dice_body"] == pytest.approx(2 * 7 / 15)  # 7 of 8 non-background
    assert result["val_dice_heart"] == pytest.approx(2 / 3)
    assert result["val_hd95_heart"] == pytest.approx(0.95)  # directed {0, 1}: 95th pct
    assert math.isnan(result["val_dice_lung_left"])  # both empty
    assert math.isnan(result["val_hd95_lung_left"])
    for organ in ("lung_right", "spinal_cord", "esophagus"):
        assert math.isnan(result[f"val_dice_{organ}"])
        assert math.isnan(result[f"val_hd95_{organ}"])
    assert result["val_dice_mean"] == pytest.approx((14 / 15 + 2 / 3) / 2)


def test_organ_metrics_missed_and_hallucinated() -> None:
    shape = (1, 1, 4)
    heart = voxels(shape, (0, 0, 1))
    esophagus = np.zeros(shape, dtype=bool)
    pred = np.array([[[0, 0, 6, 0]]], dtype=np.uint8)  # heart missed, esophagus invented
    result = organ_metrics(pred, {"heart": heart, "esophagus": esophagus},
                           ("heart", "esophagus"), (1.0, 1.0, 1.0))
    assert result["val_dice_heart"] == 0.0 and math.isinf(result["val_hd95_heart"])
    assert result["val_dice_esophagus"] == 0.0 and math.isinf(result["val_hd95_esophagus"])
    assert result["val_dice_mean"] == 0.0


def test_organ_metrics_nothing_labelled_gives_nan_mean() -> None:
    result = organ_metrics(np.zeros((2, 2, 2), np.uint8), {}, (), (1.0, 1.0, 1.0))
    assert all(math.isnan(v) for v in result.values())


def test_organ_metrics_errors() -> None:
    pred = np.zeros((2, 2, 2), np.uint8)
    with pytest.raises(FedsegError, match="heart"):
        organ_metrics(pred, {}, ("heart",), (1.0, 1.0, 1.0))
    with pytest.raises(FedsegError, match="liver"):
        organ_metrics(pred, {}, ("liver",), (1.0, 1.0, 1.0))


def _naive_hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple) -> float:
    """Whole-array reference (no cropping) of the same definition."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(3, 1)
    surfaces = [m & ~ndimage.binary_erosion(m, structure) for m in (pred, truth)]
    d_pt = ndimage.distance_transform_edt(~surfaces[1], sampling=spacing)[surfaces[0]]
    d_tp = ndimage.distance_transform_edt(~surfaces[0], sampling=spacing)[surfaces[1]]
    return float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))


@pytest.mark.parametrize("seed", range(4))
def test_hd95_cropping_matches_whole_array(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (12, 14, 16)
    blobs = []
    for _ in range(2):
        mask = np.zeros(shape, dtype=bool)
        lo = rng.integers(0, 6, 3)
        hi = lo + rng.integers(2, 8, 3)
        mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
        mask &= rng.random(shape) > 0.2  # ragged, sometimes touching the array border
        mask[tuple(lo)] = True
        blobs.append(mask)
    spacing = (2.5, 0.8, 1.1)
    assert hd95(blobs[0], blobs[1], spacing) == pytest.approx(
        _naive_hd95(blobs[0], blobs[1], spacing), rel=1e-9)
