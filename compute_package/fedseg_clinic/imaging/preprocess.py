"""Preprocessing of an imported CT and its masks: crop to the body, resample, clip HU.

Order matters: cropping first keeps resampling cheap; the HU clip comes last so the
linear interpolation of resampling sees the original values.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
from scipy import ndimage

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.imaging.series import Geometry

logger = logging.getLogger(__name__)

DEFAULT_HU_CLIP: tuple[float, float] = (-1024.0, 3071.0)
# Air is about -1000 HU, fat -100, lung -900..-500: -500 separates body from air.
BODY_THRESHOLD_HU = -500.0
# Voxels of margin kept around the body when cropping.
CROP_MARGIN_VOXELS = 2


def threshold_body_mask(hu: np.ndarray, threshold: float = BODY_THRESHOLD_HU) -> np.ndarray:
    """Body mask without a BODY contour: threshold, largest 3-D component, holes filled.

    Holes (lungs, airways) are filled slice by slice, since a lung is open to the trachea
    in 3-D but enclosed by the body in each axial slice.
    """
    above = hu > threshold
    if not above.any():
        return np.zeros(hu.shape, dtype=bool)
    labels, count = ndimage.label(above)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    body = labels == int(np.argmax(sizes))
    for k in range(body.shape[0]):
        body[k] = ndimage.binary_fill_holes(body[k])
    logger.debug("threshold body mask: %d of %d components kept", 1, count)
    return body


def crop_box(mask: np.ndarray, margin: int = CROP_MARGIN_VOXELS) -> tuple[slice, slice, slice]:
    """Bounding box of a mask (z, y, x) with a margin, clipped to the array.

    Raises:
        FedsegError: if the mask is empty.
    """
    if not mask.any():
        raise FedsegError("body mask is empty: nothing to crop to (use --no-crop)")
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        lo = max(int(present[0]) - margin, 0)
        hi = min(int(present[-1]) + margin + 1, mask.shape[axis])
        box.append(slice(lo, hi))
    return box[0], box[1], box[2]


def crop_geometry(geometry: Geometry, box: tuple[slice, slice, slice]) -> Geometry:
    """The geometry of the sub-volume ``box`` (origin moves to the box's first voxel)."""
    start_zyx = np.array([float(s.start or 0) for s in box])
    origin = geometry.index_to_lps(start_zyx[None, :])[0]
    shape = tuple(int(s.stop - (s.start or 0)) for s in box)
    return Geometry(shape=shape, spacing=geometry.spacing,  # type: ignore[arg-type]
                    origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
                    direction=geometry.direction)


def resample_geometry(geometry: Geometry, spacing: tuple[float, float, float]) -> Geometry:
    """Same origin, direction and extent (to the nearest voxel), new spacing (z, y, x)."""
    if any(s <= 0 or not np.isfinite(s) for s in spacing):
        raise FedsegError(f"spacing must be positive numbers, got {spacing}")
    shape = tuple(
        max(1, round(n * old / new))
        for n, old, new in zip(geometry.shape, geometry.spacing, spacing, strict=True)
    )
    return Geometry(shape=shape, spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
                    origin=geometry.origin, direction=geometry.direction)


def _resample(volume: np.ndarray, source: Geometry, target: Geometry, order: int,
              cval: float) -> np.ndarray:
    # Same origin and axes: target index i maps to source index i * new / old per axis.
    scale = np.array(target.spacing) / np.array(source.spacing)
    return ndimage.affine_transform(
        volume, scale, output_shape=target.shape, order=order, mode="nearest", cval=cval,
        prefilter=False,
    )


def resample(
    hu: np.ndarray, masks: Mapping[str, np.ndarray], geometry: Geometry,
    spacing: tuple[float, float, float],
) -> tuple[np.ndarray, dict[str, np.ndarray], Geometry]:
    """Resample a HU volume (linear) and masks (linear, then >= 0.5) to a new spacing.

    Returns:
        (hu float32, masks bool, new geometry); unchanged arrays when the spacing
        already matches.
    """
    if np.allclose(spacing, geometry.spacing, rtol=1e-6):
        return hu, dict(masks), geometry
    target = resample_geometry(geometry, spacing)
    new_hu = _resample(hu.astype(np.float32), geometry, target, order=1, cval=-1024.0)
    new_masks = {
        organ: _resample(mask.astype(np.float32), geometry, target, order=1, cval=0.0) >= 0.5
        for organ, mask in masks.items()
    }
    return new_hu, new_masks, target


def clip_hu(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high] and round to int16.

    Raises:
        FedsegError: if the window is empty or does not fit int16.
    """
    if not low < high:
        raise FedsegError(f"HU clip window must have low < high, got {low}..{high}")
    if low < -32768 or high > 32767:
        raise FedsegError(f"HU clip window {low}..{high} does not fit int16")
    return np.clip(np.rint(hu), low, high).astype(np.int16)
