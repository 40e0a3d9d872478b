"""Training patches: HU normalisation, random crops biased to organs, loading a split.

Flips: only along z (cranio-caudal). A left-right (x) flip would turn a left lung into
something that looks like a right lung while its label still says lung_left; an
anterior-posterior (y) flip puts the spine in front of the heart, an anatomy the model
never meets. A z flip keeps every organ's side and label, and the thoracic organs look
alike upside down at patch scale.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fedseg_clinic.cases import Case, read_case, read_manifest
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.model.unet import labels_from_masks
from fedseg_clinic.organs import THORAX, OrganSet

logger = logging.getLogger(__name__)

# At most this many voxels per organ are remembered as possible patch centres (as
# nnU-Net does): enough for variety, small enough to keep for every case.
MAX_CENTRE_CANDIDATES: int = 10_000
SPLITS: tuple[str, ...] = ("train", "val")


def normalise_hu(image: np.ndarray, hu_clip: tuple[float, float]) -> np.ndarray:
    """Map the HU window linearly onto [-1, 1]: low -> -1, high -> +1, clipped outside.

    Args:
        image: CT in Hounsfield units (any numeric dtype, usually int16).
        hu_clip: (low, high) window in HU, low < high.

    Returns:
        float32 array of the same shape.
    """
    low, high = float(hu_clip[0]), float(hu_clip[1])
    if not high > low:
        raise FedsegError(f"HU window must have low < high, got {tuple(hu_clip)}")
    clipped = np.clip(np.asarray(image, dtype=np.float32), low, high)
    return (2.0 * (clipped - low) / (high - low) - 1.0).astype(np.float32)


class PatchSampler:
    """Draws random (image, label) training patches from cases.

    Args:
        patch_size: (z, y, x) patch size in voxels.
        foreground_fraction: probability that a patch is centred on a voxel of a
            randomly chosen labelled organ (not body) present in the case; otherwise the
            crop is uniformly random.
        flip: randomly flip along z with probability 1/2 (see the module docstring).
        hu_clip: HU window for :func:`normalise_hu`; None uses each case's own
            ``meta.hu_clip``.
        organs: the organ set the label classes follow.
    """

    def __init__(
        self,
        patch_size: tuple[int, int, int],
        foreground_fraction: float = 0.33,
        flip: bool = True,
        hu_clip: tuple[float, float] | None = None,
        organs: OrganSet = THORAX,
    ) -> None:
        self.organs = organs
        sides = tuple(int(s) for s in patch_size)
        if len(sides) != 3 or any(s <= 0 for s in sides):
            raise FedsegError(f"patch size must be three positive integers, got {patch_size}")
        if not 0.0 <= foreground_fraction <= 1.0:
            raise FedsegError(f"foreground_fraction must be in [0, 1], got "
                              f"{foreground_fraction}")
        self.patch_size: tuple[int, int, int] = sides  # type: ignore[assignment]
        self.foreground_fraction = float(foreground_fraction)
        self.flip = flip
        self.hu_clip = hu_clip
        # case key -> organ -> (n, 3) candidate centres; filled lazily per case.
        self._centres: dict[tuple[str, tuple[int, ...]], dict[str, np.ndarray]] = {}

    def _organ_centres(self, case: Case) -> dict[str, np.ndarray]:
        key = (case.meta.case_id, tuple(case.image.shape))
        cached = self._centres.get(key)
        if cached is not None:
            return cached
        rng = np.random.default_rng(0)  # fixed: the candidate set is a property of the case
        centres: dict[str, np.ndarray] = {}
        for organ, mask in case.masks.items():
            if organ == self.organs.container:
                continue
            coords = np.argwhere(mask)
            if len(coords) == 0:
                continue
            if len(coords) > MAX_CENTRE_CANDIDATES:
                coords = coords[rng.choice(len(coords), MAX_CENTRE_CANDIDATES, replace=False)]
            centres[organ] = coords
        self._centres[key] = centres
        return centres

    def _start(self, centre: np.ndarray | None, shape: tuple[int, ...],
               rng: np.random.Generator) -> list[int]:
        starts = []
        for axis, (dim, side) in enumerate(zip(shape, self.patch_size, strict=True)):
            room = max(dim - side, 0)
            if centre is None:
                starts.append(int(rng.integers(0, room + 1)))
            else:
                starts.append(int(np.clip(centre[axis] - side // 2, 0, room)))
        return starts

    def sample(self, case: Case, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw one patch.

        Args:
            case: the case to crop from.
            rng: the random generator (all randomness comes from it).

        Returns:
            (image float32 (z, y, x, 1) in [-1, 1], labels uint8 (z, y, x)). Where the
            case is smaller than the patch it is padded with -1 (air) and background.
        """
        shape = tuple(case.image.shape)
        centre = None
        if rng.random() < self.foreground_fraction:
            centres = self._organ_centres(case)
            if centres:
                organ = sorted(centres)[int(rng.integers(len(centres)))]
                candidates = centres[organ]
                centre = candidates[int(rng.integers(len(candidates)))]
        starts = self._start(centre, shape, rng)
        window = tuple(
            slice(s, s + side) for s, side in zip(starts, self.patch_size, strict=True)
        )
        hu_clip = self.hu_clip if self.hu_clip is not None else case.meta.hu_clip
        image = normalise_hu(case.image[window], hu_clip)
        crop_masks = {organ: mask[window] for organ, mask in case.masks.items()}
        labels = labels_from_masks(crop_masks, image.shape, self.organs)

        if image.shape != self.patch_size:
            pad = []
            for dim, side in zip(image.shape, self.patch_size, strict=True):
                before = (side - dim) // 2
                pad.append((before, side - dim - before))
            image = np.pad(image, pad, constant_values=-1.0)
            labels = np.pad(labels, pad, constant_values=0)

        if self.flip and rng.random() < 0.5:
            image = image[::-1]
            labels = labels[::-1]
        return (
            np.ascontiguousarray(image, dtype=np.float32)[..., None],
            np.ascontiguousarray(labels, dtype=np.uint8),
        )


def load_cases(cases_dir: Path, split: str) -> list[Case]:
    """Read every case of one split of a clinic folder.

    Cases without any labelled organ are skipped (logged): they carry no training signal.

    Raises:
        FedsegError: missing folder or manifest, unknown or empty split, or no case of
            the split with a labelled organ.
    """
    if split not in SPLITS:
        raise FedsegError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    manifest = read_manifest(cases_dir)  # raises for a missing folder or manifest
    entries = manifest.split(split)
    if not entries:
        raise FedsegError(f"{cases_dir}: no cases in split {split!r}")
    cases = []
    for entry in entries:
        case = read_case(cases_dir / entry.case_id)
        if not case.meta.labelled_organs:
            logger.warning("%s: case %s has no labelled organ; skipped", cases_dir,
                           entry.case_id)
            continue
        cases.append(case)
    if not cases:
        raise FedsegError(f"{cases_dir}: no case in split {split!r} has a labelled organ")
    return cases
