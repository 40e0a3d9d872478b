"""Label maps (NIfTI, NRRD files; DICOM SEG objects) resampled onto a CT grid.

A label map is an integer volume whose non-zero values are structures. Its own voxel
grid may have any orientation and spacing: we read its index -> patient affine, convert
it to LPS (NIfTI stores RAS, NRRD says which space it uses) and resample it onto the
CT grid by nearest neighbour (scipy.ndimage.affine_transform, order 0), so labels never
blend.

Structure names: Slicer-style NRRD headers (``SegmentN_Name`` + ``SegmentN_LabelValue``)
name each label; otherwise a file with one label is named after the file (``heart_seg.nrrd``
-> "heart") and a file with several labels gives "<stem> <value>" names.

DICOM SEG (BINARY, FRACTIONAL, LABELMAP): each frame is a plane with its own position;
it is resampled (nearest neighbour, 2-D) onto the CT slices it covers; segments are
named by their SegmentLabel.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import numpy as np
from scipy import ndimage

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.imaging.series import Geometry

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
    if not np.all(np.isfinite(labelmap.affine)):
        # NaN would slip through the determinant test below (NaN < x is False).
        raise FedsegError(f"{path}: non-finite value in the voxel-to-patient matrix "
                          f"(origin or spacing): {labelmap.affine[:3].tolist()}")
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


# --- DICOM SEG -----------------------------------------------------------------------


@dataclasses.dataclass
class SegFrame:
    """One frame of a DICOM SEG: a 2-D plane of one segment (or label values)."""

    pixels: np.ndarray  # (rows, cols); bool for BINARY/FRACTIONAL, ints for LABELMAP
    segment: int  # segment number; 0 for LABELMAP frames (values are segment numbers)
    position: np.ndarray  # LPS of pixel (0, 0)
    row_dir: np.ndarray  # LPS unit vector along a row (column index increases)
    col_dir: np.ndarray  # LPS unit vector down a column (row index increases)
    spacing: tuple[float, float]  # (between rows, between columns) mm
    thickness: float


@dataclasses.dataclass
class DicomSeg:
    """A DICOM Segmentation object reduced to what rasterising needs.

    Attributes:
        path: the file.
        series_uids: referenced source image series.
        frame_of_reference_uid: FrameOfReferenceUID of the SEG.
        names: segment number -> SegmentLabel.
        frames: the frames with their planes.
    """

    path: Path
    series_uids: list[str]
    frame_of_reference_uid: str
    names: dict[int, str]
    frames: list[SegFrame]


def _item(group: object, name: str) -> object | None:
    seq = getattr(group, name, None) if group is not None else None
    return seq[0] if seq else None


def read_dicom_seg(path: Path) -> DicomSeg:
    """Read a DICOM SEG (BINARY, FRACTIONAL or LABELMAP segmentation type).

    Raises:
        FedsegError: naming the file when it is unreadable or lacks plane information.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        frames = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any read/decode failure is the user's file
        raise FedsegError(f"{path}: cannot read DICOM SEG ({exc})") from None
    if ds.get("Modality") != "SEG":
        raise FedsegError(f"{path}: not a DICOM SEG (Modality {ds.get('Modality')!r})")
    try:
        return _parse_dicom_seg(ds, frames, path)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        # Missing or malformed mandatory attributes: the file's problem, not ours.
        raise FedsegError(f"{path}: malformed DICOM SEG ({type(exc).__name__}: {exc})") from None


def _parse_dicom_seg(ds: object, frames: np.ndarray, path: Path) -> DicomSeg:
    n_frames = int(ds.get("NumberOfFrames", 1))
    frames = frames.reshape(n_frames, int(ds.Rows), int(ds.Columns))
    seg_type = str(ds.get("SegmentationType", "BINARY"))
    if seg_type == "FRACTIONAL":
        frames = frames > 0.5 * float(ds.get("MaximumFractionalValue", 255))
    elif seg_type == "BINARY":
        frames = frames.astype(bool)
    names = {int(s.SegmentNumber): str(s.get("SegmentLabel", f"segment {s.SegmentNumber}"))
             for s in ds.get("SegmentSequence", [])}
    names.pop(0, None)  # LABELMAP's background
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    if len(per_frame) != n_frames:
        raise FedsegError(f"{path}: {len(per_frame)} per-frame groups for {n_frames} frames")
    out: list[SegFrame] = []
    for index, group in enumerate(per_frame):
        def pick(name: str, group: object = group) -> object | None:
            return _item(group, name) or _item(shared, name)

        position = pick("PlanePositionSequence")
        orientation = pick("PlaneOrientationSequence")
        measures = pick("PixelMeasuresSequence")
        if position is None or orientation is None or measures is None:
            raise FedsegError(f"{path}: frame {index + 1} lacks plane position, orientation or "
                              "pixel spacing")
        iop = np.asarray([float(v) for v in orientation.ImageOrientationPatient])
        spacing = [float(v) for v in measures.PixelSpacing]
        thickness = float(measures.get("SliceThickness") or measures.get("SpacingBetweenSlices")
                          or 0.0)
        ident = _item(group, "SegmentIdentificationSequence") or _item(
            shared, "SegmentIdentificationSequence")
        segment = int(ident.ReferencedSegmentNumber) if ident is not None else 0
        if seg_type != "LABELMAP" and segment == 0:
            raise FedsegError(f"{path}: frame {index + 1} names no segment")
        frame_position = np.asarray([float(v) for v in position.ImagePositionPatient])
        if not (np.all(np.isfinite(iop)) and np.all(np.isfinite(frame_position))
                and all(np.isfinite(v) and v > 0 for v in spacing)
                and np.isfinite(thickness) and thickness >= 0):
            raise FedsegError(
                f"{path}: frame {index + 1}: PixelSpacing {spacing}, SliceThickness "
                f"{thickness}, ImagePositionPatient {frame_position.tolist()} and "
                f"ImageOrientationPatient {iop.tolist()} must be finite (spacing positive)")
        out.append(SegFrame(
            pixels=frames[index], segment=segment,
            position=frame_position,
            row_dir=iop[:3], col_dir=iop[3:], spacing=(spacing[0], spacing[1]),
            thickness=thickness,
        ))
    series = [str(s.SeriesInstanceUID) for s in ds.get("ReferencedSeriesSequence", [])]
    return DicomSeg(path=path, series_uids=series,
                    frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
                    names=names, frames=out)


def dicom_seg_to_grid(seg: DicomSeg, geometry: Geometry) -> dict[int, np.ndarray]:
    """Resample each segment of a SEG by nearest neighbour onto a (z, y, x) grid.

    A frame covers the grid slices whose centres lie within half its thickness of its
    plane (at least the nearest slice, if within the volume). Frames must be parallel to
    the grid's slices.

    Returns:
        segment number -> bool (z, y, x) mask (every named segment, empty if absent).

    Raises:
        FedsegError: if a frame is not parallel to the grid's slices.
    """
    nz, ny, nx = geometry.shape
    dz, dy, dx = geometry.spacing
    direction = np.asarray(geometry.direction)
    u, v, n = direction[:, 0], direction[:, 1], direction[:, 2]
    origin = np.asarray(geometry.origin)
    masks = {number: np.zeros(geometry.shape, dtype=bool) for number in seg.names}
    for frame in seg.frames:
        frame_normal = np.cross(frame.row_dir, frame.col_dir)
        if abs(abs(float(frame_normal @ n)) - 1.0) > 1e-3:
            raise FedsegError(f"{seg.path}: SEG frames are not parallel to the CT slices")
        k_centre = float((frame.position - origin) @ n) / dz
        half = max(frame.thickness, 1e-6) / (2.0 * dz)
        ks = [k for k in range(nz) if abs(k - k_centre) < half - 1e-6]
        nearest = round(k_centre)
        if not ks and 0 <= nearest < nz and abs(nearest - k_centre) <= 0.5:
            ks = [nearest]
        dr, dc = frame.spacing
        # Grid (j, i) on slice k -> frame (r, c): project onto the frame's axes.
        matrix = np.array([[dy * (v @ frame.col_dir) / dr, dx * (u @ frame.col_dir) / dr],
                           [dy * (v @ frame.row_dir) / dc, dx * (u @ frame.row_dir) / dc]])
        for k in ks:
            delta = origin + k * dz * n - frame.position
            offset = np.array([delta @ frame.col_dir / dr, delta @ frame.row_dir / dc])
            plane = ndimage.affine_transform(
                frame.pixels.astype(np.int32), matrix, offset=offset, output_shape=(ny, nx),
                order=0, mode="grid-constant", cval=0,
            )
            if frame.segment:
                if frame.segment in masks:
                    masks[frame.segment][k] |= plane.astype(bool)
            else:
                for number, mask in masks.items():
                    mask[k] |= plane == number
    return masks
