"""Find DICOM files in a folder and read one CT series into a HU volume with geometry.

Slices are ordered by their position along the slice normal (the cross product of the
two ImageOrientationPatient vectors, dotted with ImagePositionPatient), never by
InstanceNumber, which scanners and anonymisers renumber freely. The volume geometry
follows the conventions of :mod:`fedseg_clinic.cases`: arrays are (z, y, x),
``origin`` is the LPS centre of voxel (0, 0, 0) and ``direction`` has the LPS unit
vectors of the x, y and z array axes as its columns.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from fedseg_clinic.errors import FedsegError

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

# Slice spacing may wobble by scanner rounding (positions are written as decimal strings
# with a handful of digits); beyond this it is a real gap, duplicate or uneven series.
SPACING_RTOL = 0.01
SPACING_ATOL_MM = 0.02


@dataclasses.dataclass(frozen=True)
class Geometry:
    """A voxel grid in DICOM patient coordinates (LPS, mm).

    Attributes:
        shape: array shape (z, y, x).
        spacing: voxel size (z, y, x) in mm.
        origin: LPS position (x, y, z) of the centre of voxel (0, 0, 0).
        direction: 3x3 matrix, columns = LPS unit vectors of array axes x, y, z.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]

    def matrix(self) -> np.ndarray:
        """4x4 affine mapping homogeneous (x, y, z) index -> LPS mm."""
        direction = np.asarray(self.direction, dtype=np.float64)
        scale = np.diag([self.spacing[2], self.spacing[1], self.spacing[0]])
        affine = np.eye(4)
        affine[:3, :3] = direction @ scale
        affine[:3, 3] = self.origin
        return affine

    def index_to_lps(self, zyx: np.ndarray) -> np.ndarray:
        """Map (n, 3) continuous (z, y, x) indices to (n, 3) LPS points."""
        xyz = np.asarray(zyx, dtype=np.float64)[:, ::-1]
        affine = self.matrix()
        return xyz @ affine[:3, :3].T + affine[:3, 3]

    def lps_to_index(self, points: np.ndarray) -> np.ndarray:
        """Map (n, 3) LPS points to (n, 3) continuous (z, y, x) indices."""
        affine = self.matrix()
        xyz = np.linalg.solve(affine[:3, :3], (np.asarray(points, np.float64) - affine[:3, 3]).T).T
        return xyz[:, ::-1]

    def flat_direction(self) -> tuple[float, ...]:
        """Row-major 9-tuple of ``direction`` as stored in CaseMeta."""
        return tuple(float(v) for row in self.direction for v in row)


@dataclasses.dataclass
class DicomFile:
    """Header facts of one DICOM file found while scanning a folder."""

    path: Path
    modality: str
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    patient_id: str
    frame_of_reference_uid: str


@dataclasses.dataclass
class ScanResult:
    """What :func:`scan_folder` found.

    Attributes:
        dicom: readable DICOM files, by modality.
        other: files that are not DICOM (label maps are picked from these).
        skipped: (file, reason) for unreadable or unsupported files.
    """

    dicom: list[DicomFile]
    other: list[Path]
    skipped: list[tuple[Path, str]]

    def series_files(self) -> dict[str, list[DicomFile]]:
        """CT image files grouped by SeriesInstanceUID."""
        groups: dict[str, list[DicomFile]] = {}
        for item in self.dicom:
            if item.modality == "CT":
                groups.setdefault(item.series_uid, []).append(item)
        return groups

    def of_modality(self, modality: str) -> list[DicomFile]:
        """Files of one modality (e.g. "RTSTRUCT", "SEG")."""
        return [d for d in self.dicom if d.modality == modality]


@dataclasses.dataclass
class CtSeries:
    """One CT series read into a HU volume.

    Attributes:
        series_uid: SeriesInstanceUID.
        study_uid: StudyInstanceUID.
        patient_id: DICOM PatientID (only for pseudonymisation; never written out).
        frame_of_reference_uid: FrameOfReferenceUID ("" when absent).
        sop_uids: SOPInstanceUID of each slice, in array z order.
        files: file of each slice, in array z order.
        hu: float32 (z, y, x) Hounsfield units (RescaleSlope/Intercept applied).
        geometry: the voxel grid.
        warnings: problems that did not stop the read (one line each, naming the file).
    """

    series_uid: str
    study_uid: str
    patient_id: str
    frame_of_reference_uid: str
    sop_uids: list[str]
    files: list[Path]
    hu: np.ndarray
    geometry: Geometry
    warnings: list[str] = dataclasses.field(default_factory=list)


_LABELMAP_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz")


def _is_dicom_candidate(path: Path) -> bool:
    name = path.name.lower()
    return not any(name.endswith(s) for s in _LABELMAP_SUFFIXES)


def _header(path: Path) -> DicomFile | str:
    """Header facts of a DICOM file, or why it cannot be used."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        modality = str(ds.get("Modality", ""))
        sop_class = str(ds.get("SOPClassUID", ""))
        item = DicomFile(
            path=path,
            modality=modality,
            sop_class_uid=sop_class,
            sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
            series_uid=str(ds.get("SeriesInstanceUID", "")),
            study_uid=str(ds.get("StudyInstanceUID", "")),
            patient_id=str(ds.get("PatientID", "")),
            frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        )
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    except InvalidDicomError:
        return "not a DICOM file"
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on junk
        return f"not a readable DICOM file ({type(exc).__name__})"
    if not modality and not sop_class:
        return "DICOM file without Modality or SOPClassUID (truncated or empty?)"
    if sop_class == RTSTRUCT_STORAGE:
        item.modality = "RTSTRUCT"
    elif sop_class == SEG_STORAGE:
        item.modality = "SEG"
    if item.modality == "CT":
        missing = [name for name, value in (("SeriesInstanceUID", item.series_uid),
                                            ("SOPInstanceUID", item.sop_instance_uid))
                   if not value]
        if missing:
            return f"CT file without {' and '.join(missing)}"
    if item.modality == "CT" and "LOCALIZER" in image_type:
        # Scout images are projections, not slices; they would look like a second series.
        return "CT localizer (scout) image, not a slice"
    return item


def scan_folder(src: Path, exclude: Sequence[Path] = ()) -> ScanResult:
    """Walk ``src`` (nested folders allowed) and classify every file by its header.

    Unreadable files and non-DICOM files are never fatal: they are listed in
    ``skipped`` (DICOM-looking failures) or ``other`` (label map candidates). Hidden
    files and folders are ignored.

    Args:
        src: the folder.
        exclude: folders not to enter (e.g. an output folder inside ``src``).

    Raises:
        FedsegError: if ``src`` is not a folder.
    """
    if not src.is_dir():
        raise FedsegError(f"{src}: not a folder")
    excluded = {p.resolve() for p in exclude}
    found: list[DicomFile] = []
    other: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    for root, dirs, names in os.walk(src):
        dirs[:] = sorted(
            d for d in dirs
            if not d.startswith(".") and (Path(root) / d).resolve() not in excluded
        )
        for name in sorted(names):
            path = Path(root) / name
            if name.startswith("."):
                continue
            if not _is_dicom_candidate(path):
                other.append(path)
                continue
            header = _header(path)
            if isinstance(header, str):
                skipped.append((path, header))
            else:
                found.append(header)
    logger.info("%s: %d DICOM files, %d other, %d skipped", src, len(found), len(other),
                len(skipped))
    return ScanResult(dicom=found, other=other, skipped=skipped)


def _vector(ds: pydicom.Dataset, keyword: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(keyword)
    if value is None:
        raise FedsegError(f"{path}: CT slice has no {keyword}")
    try:
        vec = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise FedsegError(f"{path}: malformed {keyword} {value!r}") from None
    if vec.shape != (n,) or not np.all(np.isfinite(vec)):
        raise FedsegError(f"{path}: {keyword} must hold {n} numbers, got {value!r}")
    return vec


def _decode_hu(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise anything on bad data
        raise FedsegError(f"{path}: cannot decode pixel data ({exc})") from None
    if pixels.ndim != 2:
        raise FedsegError(f"{path}: expected one grey-level frame, got pixel shape "
                          f"{pixels.shape} (multi-frame/colour CT is not supported)")
    values = {}
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        raw = ds.get(keyword)
        try:
            values[keyword] = default if raw is None or raw == "" else float(raw)
        except (TypeError, ValueError):
            raise FedsegError(f"{path}: malformed {keyword} {raw!r}") from None
        if not np.isfinite(values[keyword]):
            # NaN would become 0 HU after the int16 cast: refuse instead of importing noise.
            raise FedsegError(f"{path}: {keyword} is {raw!r}, not a finite number")
    slope, intercept = values["RescaleSlope"], values["RescaleIntercept"]
    if slope == 0:
        raise FedsegError(f"{path}: RescaleSlope is 0 (every voxel would be "
                          f"{intercept:g} HU)")
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def _check_spacing(positions: np.ndarray, files: Sequence[Path]) -> float:
    """Return the slice spacing; raise on duplicate, missing or uneven slices."""
    steps = np.diff(positions)
    tol = SPACING_ATOL_MM
    for i, step in enumerate(steps):
        if step <= tol:
            raise FedsegError(
                f"{files[i + 1]}: duplicated slice: same position {positions[i]:.3f} mm along "
                f"the slice normal as {files[i]}"
            )
    spacing = float(np.median(steps))
    tol = max(SPACING_ATOL_MM, SPACING_RTOL * spacing)
    for i, step in enumerate(steps):
        if abs(step - spacing) <= tol:
            continue
        ratio = step / spacing
        if ratio > 1.5 and abs(ratio - round(ratio)) * spacing <= tol:
            raise FedsegError(
                f"{files[i + 1]}: {round(ratio) - 1} missing slice(s) before this file "
                f"(gap {step:.3f} mm after {files[i]}, spacing {spacing:.3f} mm)"
            )
        raise FedsegError(
            f"{files[i + 1]}: uneven slice spacing: {step:.3f} mm after {files[i]}, "
            f"median {spacing:.3f} mm"
        )
    return spacing


def read_series(files: Sequence[Path]) -> CtSeries:
    """Read the CT slices of one series into a HU volume.

    Args:
        files: the files of one SeriesInstanceUID, in any order.

    Returns:
        The series with slices ordered along the slice normal.

    Raises:
        FedsegError: naming the file, for undecodable pixels, inconsistent orientation,
            pixel spacing or size, duplicated or missing slices, or uneven spacing.
    """
    if not files:
        raise FedsegError("empty CT series")
    slices: list[tuple[float, Path, pydicom.Dataset]] = []
    first_orient: np.ndarray | None = None
    first_spacing: np.ndarray | None = None
    normal = np.zeros(3)
    for path in files:
        try:
            # Headers first; pixels are read one slice at a time below to bound memory.
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - unreadable file is the user's input
            raise FedsegError(f"{path}: cannot read DICOM ({exc})") from None
        orient = _vector(ds, "ImageOrientationPatient", 6, path)
        spacing = _vector(ds, "PixelSpacing", 2, path)
        if not np.all(spacing > 0):
            # A zero spacing makes the voxel-to-patient matrix singular.
            raise FedsegError(f"{path}: PixelSpacing must be two positive numbers, got "
                              f"{ds.get('PixelSpacing')!r}")
        position = _vector(ds, "ImagePositionPatient", 3, path)
        if first_orient is None:
            first_orient, first_spacing = orient, spacing
            row, col = orient[:3], orient[3:]
            normal = np.cross(row, col)
            if not 0.99 < np.linalg.norm(normal) < 1.01 or abs(float(row @ col)) > 1e-3:
                raise FedsegError(f"{path}: ImageOrientationPatient is not two orthogonal "
                                  f"unit vectors: {list(orient)}")
        else:
            if not np.allclose(orient, first_orient, atol=1e-4):
                raise FedsegError(f"{path}: ImageOrientationPatient differs from {files[0]}")
            if not np.allclose(spacing, first_spacing, rtol=1e-4, atol=1e-5):
                raise FedsegError(f"{path}: PixelSpacing differs from {files[0]}")
        slices.append((float(position @ normal), path, ds))
    slices.sort(key=lambda item: item[0])
    positions = np.asarray([s[0] for s in slices])
    ordered_files = [s[1] for s in slices]
    first = slices[0][2]
    warnings: list[str] = []
    if len(slices) > 1:
        dz = _check_spacing(positions, ordered_files)
    else:
        thickness = first.get("SpacingBetweenSlices") or first.get("SliceThickness")
        try:
            dz = float(thickness) if thickness else 1.0
        except (TypeError, ValueError):
            raise FedsegError(f"{ordered_files[0]}: malformed slice thickness "
                              f"{thickness!r}") from None
        if not (np.isfinite(dz) and dz > 0):
            raise FedsegError(f"{ordered_files[0]}: slice thickness {thickness!r} is not a "
                              "positive number")
        if not thickness:
            warnings.append(f"{ordered_files[0]}: single slice without SliceThickness; "
                            "z spacing set to 1 mm")
    # Positions must also line up along the normal: an in-plane shift breaks the grid.
    origin = _vector(first, "ImagePositionPatient", 3, ordered_files[0])
    for pos_along, path, ds in slices[1:]:
        pos = _vector(ds, "ImagePositionPatient", 3, path)
        offset = pos - origin - normal * (pos_along - positions[0])
        if np.linalg.norm(offset) > max(0.1, 0.05 * dz):
            raise FedsegError(f"{path}: slice is shifted in-plane by {np.linalg.norm(offset):.2f} "
                              f"mm relative to {ordered_files[0]}")
    volume: np.ndarray | None = None
    for k, (_, path, _header_ds) in enumerate(slices):
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:  # noqa: BLE001 - unreadable file is the user's input
            raise FedsegError(f"{path}: cannot read DICOM ({exc})") from None
        hu = _decode_hu(ds, path)
        if volume is None:
            volume = np.empty((len(slices), *hu.shape), dtype=np.float32)
        elif hu.shape != volume.shape[1:]:
            raise FedsegError(f"{path}: slice size {hu.shape} differs from {volume.shape[1:]}")
        volume[k] = hu
    assert volume is not None
    assert first_orient is not None and first_spacing is not None
    direction = np.stack([first_orient[:3], first_orient[3:], normal], axis=1)
    geometry = Geometry(
        shape=(int(volume.shape[0]), int(volume.shape[1]), int(volume.shape[2])),
        spacing=(float(dz), float(first_spacing[0]), float(first_spacing[1])),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=tuple(tuple(float(v) for v in r) for r in direction),  # type: ignore[misc]
    )
    return CtSeries(
        series_uid=str(first.get("SeriesInstanceUID", "")),
        study_uid=str(first.get("StudyInstanceUID", "")),
        patient_id=str(first.get("PatientID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        sop_uids=[str(s[2].get("SOPInstanceUID", "")) for s in slices],
        files=ordered_files,
        hu=volume,
        geometry=geometry,
        warnings=warnings,
    )
