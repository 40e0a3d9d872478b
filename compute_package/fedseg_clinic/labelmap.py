"""Label map files (NIfTI, NRRD) in patient coordinates, resampled onto a CT grid.

A label map is an integer volume whose non-zero values are structures. Its own voxel
grid may have any orientation and spacing: we read its index -> patient affine, convert
it to LPS (NIfTI stores RAS, NRRD says which space it uses) and resample it onto the
CT grid by nearest neighbour (scipy.ndimage.affine_transform, order 0), so labels never
blend.

Structure names: Slicer-style NRRD headers (``SegmentN_Name`` + ``SegmentN_LabelValue``)
name each label; otherwise a file with one label is named after the file (``heart_seg.nrrd``
-> "heart") and a file with several labels gives "<stem> <value>" names.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import numpy as np
from scipy import ndimage

from fedseg_clinic.dicom_series import Geometry
from fedseg_clinic.errors import FedsegError

logger = logging.getLogger(__name__)

# Sign flips from each NRRD space to LPS (x, y, z).
_NRRD_SPACES: dict[str, tuple[float, float, float]] = {
    "left-posterior-superior": (1.0, 1.0, 1.0),
    "lps": (1.0, 1.0, 1.0),
    "right-anterior-superior": (-1.0, -1.0, 1.0),
    "ras": (-1.0, -1.0, 1.0),
    "left-anterior-superior": (1.0, -1.0, 1.0),
    "las": (1.0, -1.0, 1.0),
}

_NAME_SUFFIX = re.compile(r"([_\-. ]?(seg|segmentation|label|labels|labelmap|mask))+$", re.I)


@dataclasses.dataclass
class LabelMap:
    """An integer label volume with its own geometry.

    Attributes:
        path: the file.
        labels: integer (i, j, k) array in file index order (x fastest axis first).
        affine: 4x4 mapping homogeneous (i, j, k) index -> LPS mm.
        names: label value -> structure name.
    """

    path: Path
    labels: np.ndarray
    affine: np.ndarray
    names: dict[int, str]


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return _NAME_SUFFIX.sub("", name) or name


def _default_names(path: Path, labels: np.ndarray) -> dict[int, str]:
    values = [int(v) for v in np.unique(labels) if v != 0]
    stem = _stem(path)
    if len(values) == 1:
        return {values[0]: stem}
    return {v: f"{stem} {v}" for v in values}


def _read_nrrd(path: Path) -> LabelMap:
    import nrrd

    try:
        data, header = nrrd.read(str(path))
    except Exception as exc:  # noqa: BLE001 - pynrrd raises its own and numpy errors
        raise FedsegError(f"{path}: cannot read NRRD ({exc})") from None
    if data.ndim != 3:
        raise FedsegError(f"{path}: label map must be 3-D, got shape {data.shape}")
    space = str(header.get("space", "")).lower()
    if space not in _NRRD_SPACES:
        raise FedsegError(f"{path}: NRRD space {space or '(none)'!r} is not a patient space")
    directions = np.asarray(header.get("space directions"), dtype=np.float64)
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    if directions.shape != (3, 3) or not np.all(np.isfinite(directions)):
        raise FedsegError(f"{path}: NRRD needs 3 finite space directions")
    flip = np.asarray(_NRRD_SPACES[space])
    affine = np.eye(4)
    # NRRD "space directions" lists one vector per axis: columns of the affine.
    affine[:3, :3] = (directions * flip[None, :]).T
    affine[:3, 3] = origin * flip
    names = _default_names(path, data)
    for key, value in header.items():
        match = re.fullmatch(r"Segment(\d+)_Name", key)
        if match:
            label_key = f"Segment{match.group(1)}_LabelValue"
            if label_key in header:
                names[int(header[label_key])] = str(value)
    return LabelMap(path=path, labels=data, affine=affine, names=names)


def _read_nifti(path: Path) -> LabelMap:
    import nibabel

    try:
        image = nibabel.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on bad files
        raise FedsegError(f"{path}: cannot read NIfTI ({exc})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise FedsegError(f"{path}: label map must be 3-D, got shape {data.shape}")
    # NIfTI world space is RAS: flip x and y to reach DICOM's LPS.
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(image.affine, dtype=np.float64)
    return LabelMap(path=path, labels=data, affine=affine, names=_default_names(path, data))


def read_labelmap(path: Path) -> LabelMap:
    """Read a NIfTI (.nii, .nii.gz) or NRRD (.nrrd, .nhdr) label map.

    Raises:
        FedsegError: naming the file when it is unreadable, not 3-D, not integer, or
            not in a patient coordinate space.
    """
    name = path.name.lower()
    if name.endswith((".nrrd", ".nhdr")):
        labelmap = _read_nrrd(path)
    elif name.endswith((".nii", ".nii.gz")):
        labelmap = _read_nifti(path)
    else:
        raise FedsegError(f"{path}: unknown label map format (use .nii, .nii.gz or .nrrd)")
    if not np.issubdtype(labelmap.labels.dtype, np.integer):
        values = labelmap.labels
        if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
            raise FedsegError(f"{path}: label map holds non-integer values "
                              f"(dtype {values.dtype}); is it an image?")
        labelmap.labels = values.astype(np.int32)
    if abs(np.linalg.det(labelmap.affine[:3, :3])) < 1e-9:
        raise FedsegError(f"{path}: degenerate voxel-to-patient matrix")
    return labelmap


def labelmap_to_grid(labelmap: LabelMap, geometry: Geometry) -> np.ndarray:
    """Resample a label map by nearest neighbour onto a (z, y, x) grid.

    Voxels of the grid outside the label map get label 0.

    Returns:
        int32 (z, y, x) labels on ``geometry``.
    """
    # target (z, y, x) index -> LPS -> label-map (i, j, k) index, as one affine.
    target = geometry.matrix()
    zyx_to_xyz = np.zeros((4, 4))
    zyx_to_xyz[0, 2] = zyx_to_xyz[1, 1] = zyx_to_xyz[2, 0] = zyx_to_xyz[3, 3] = 1.0
    full = np.linalg.inv(labelmap.affine) @ target @ zyx_to_xyz
    labels = np.ascontiguousarray(labelmap.labels, dtype=np.int32)
    return ndimage.affine_transform(
        labels, full[:3, :3], offset=full[:3, 3], output_shape=geometry.shape, order=0,
        mode="grid-constant", cval=0,
    )


def bounds_overlap(labelmap: LabelMap, geometry: Geometry) -> bool:
    """True when the label map's box and the grid's box overlap in patient space."""

    def box(affine: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        corners = np.array(
            [[i, j, k, 1.0] for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5)
             for k in (-0.5, shape[2] - 0.5)]
        )
        points = corners @ affine.T
        return points[:, :3].min(axis=0), points[:, :3].max(axis=0)

    lo1, hi1 = box(labelmap.affine, labelmap.labels.shape)
    nz, ny, nx = geometry.shape
    lo2, hi2 = box(geometry.matrix(), (nx, ny, nz))
    return bool(np.all(lo1 < hi2) and np.all(lo2 < hi1))
