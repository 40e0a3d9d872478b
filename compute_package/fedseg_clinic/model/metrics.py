"""Segmentation metrics per organ: Dice and the 95th-percentile Hausdorff distance.

Conventions (nnU-Net / MONAI / medpy):

- Dice is NaN when prediction and truth are both empty (nothing to find, nothing found:
  undefined, left out of means), 0 when exactly one is empty.
- HD95 (mm) is computed on surfaces: a surface voxel is a mask voxel with at least one
  6-neighbour outside the mask (``mask & ~binary_erosion(mask)``; voxels on the array
  border count as surface). For every surface voxel of one mask the Euclidean distance
  (in mm, through ``spacing``) to the nearest surface voxel of the other is taken; HD95
  is the larger of the two directed 95th percentiles (as medpy's ``hd95`` and MONAI's
  ``compute_hausdorff_distance(percentile=95)``).
- HD95 is NaN when both are empty and **inf** when exactly one is empty: a missed or
  hallucinated organ is the worst possible boundary error, and NaN is reserved for
  "not measured". Means over cases should therefore report how many were inf, or use
  the median.
- An organ a clinic does not contour is NaN in both metrics (docs/experiments.md, round log).

Surface Dice at a tolerance is not provided: no maintained library in the stack has it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.organs import THORAX, OrganSet


def _check_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise FedsegError(f"metrics: prediction shape {pred.shape} != truth shape "
                          f"{truth.shape}")
    return pred, truth


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (NaN when both are empty)."""
    pred, truth = _check_pair(pred, truth)
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return math.nan
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, iterations=1)


def _directed_distances(
    from_surface: np.ndarray, to_surface: np.ndarray, spacing: Sequence[float]
) -> np.ndarray:
    """Distance (mm) from every voxel of ``from_surface`` to the nearest of ``to_surface``."""
    distance_map = ndimage.distance_transform_edt(~to_surface, sampling=spacing)
    return distance_map[from_surface]


def _union_box(pred: np.ndarray, truth: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of both masks grown by one voxel (within the array).

    Every surface voxel lies inside it, so distances between surfaces are unchanged; the
    extra voxel of background keeps the erosion identical to the uncropped one (and at
    the array border ``binary_erosion``'s border value 0 plays the same part).
    """
    union = pred | truth
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, union.shape[axis])))
    return tuple(box)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance in mm.

    Args:
        pred: boolean mask (z, y, x).
        truth: boolean mask of the same shape.
        spacing: voxel size (z, y, x) in mm.

    Returns:
        The distance; NaN when both masks are empty, inf when exactly one is.
    """
    pred, truth = _check_pair(pred, truth)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim or any(not s > 0 for s in spacing):
        raise FedsegError(f"metrics: spacing must be {pred.ndim} positive numbers, "
                          f"got {spacing}")
    has_pred, has_truth = bool(pred.any()), bool(truth.any())
    if not has_pred and not has_truth:
        return math.nan
    if has_pred != has_truth:
        return math.inf
    # Distance transforms cost O(volume): work on the organs' box, not the whole scan.
    box = _union_box(pred, truth)
    pred_surface, truth_surface = _surface(pred[box]), _surface(truth[box])
    forward = _directed_distances(pred_surface, truth_surface, spacing)
    backward = _directed_distances(truth_surface, pred_surface, spacing)
    return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))


def organ_metrics(
    pred_labels: np.ndarray,
    masks: Mapping[str, np.ndarray],
    labelled_organs: Iterable[str],
    spacing: Sequence[float],
    organs: OrganSet = THORAX,
) -> dict[str, float]:
    """Dice and HD95 for every organ of an organ set on one case.

    Args:
        pred_labels: predicted uint8 label map (z, y, x); class k is organs.organs[k - 1].
        masks: organ -> boolean truth mask (the case's contours, overlaps included).
        labelled_organs: the organs the case is contoured for; others are NaN.
        spacing: voxel size (z, y, x) in mm.
        organs: the organ set the classes follow.

    Returns:
        ``val_dice_<organ>`` and ``val_hd95_<organ>`` for every organ of the set, plus
        ``val_dice_mean``: the mean of the labelled organs' Dice ignoring NaN (NaN when
        none is defined). The set's container (body) is predicted by every
        non-background class.
    """
    labelled = set(labelled_organs)
    unknown = sorted(labelled - set(organs.organs))
    if unknown:
        raise FedsegError(f"metrics: organ(s) {', '.join(unknown)} not in organ set "
                          f"{organs.name}")
    result: dict[str, float] = {}
    dices: list[float] = []
    for index, organ in enumerate(organs.organs, start=1):
        if organ not in labelled:
            result[f"val_dice_{organ}"] = math.nan
            result[f"val_hd95_{organ}"] = math.nan
            continue
        truth = masks.get(organ)
        if truth is None:
            raise FedsegError(f"metrics: organ {organ} is labelled but has no mask")
        pred = pred_labels != 0 if organ == organs.container else pred_labels == index
        result[f"val_dice_{organ}"] = dice(pred, truth)
        result[f"val_hd95_{organ}"] = hd95(pred, truth, spacing)
        dices.append(result[f"val_dice_{organ}"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slice is a valid NaN
        result["val_dice_mean"] = float(np.nanmean(dices)) if dices else math.nan
    return result
