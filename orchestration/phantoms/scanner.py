"""The scanner model: blur, noise and calibration offset of one clinic."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from fedseg.orchestration.phantoms.spec import HU_CLIP, ClinicSpec

logger = logging.getLogger(__name__)


def apply_scanner(hu: np.ndarray, clinic: ClinicSpec, spacing: Sequence[float],
                  rng: np.random.Generator) -> np.ndarray:
    """Scanner effects in order blur, noise, offset; rounded and clipped to int16 HU."""
    out = hu.astype(np.float32, copy=True)
    if clinic.blur_sigma_mm > 0:
        sigma = [clinic.blur_sigma_mm / d for d in spacing]
        out = ndimage.gaussian_filter(out, sigma=sigma, mode="nearest")
    if clinic.noise_sigma > 0:
        out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(clinic.noise_sigma)
    out += np.float32(clinic.hu_offset)
    np.rint(out, out=out)
    np.clip(out, HU_CLIP[0], HU_CLIP[1], out=out)
    return out.astype(np.int16)
