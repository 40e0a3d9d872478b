"""Find DICOM files in a folder and read one CT series into a HU volume with geometry.

Slices are ordered by their position along the slice normal (the cross product of the
two ImageOrientationPatient vectors, dotted with ImagePositionPatient), never by
InstanceNumber, which scanners and anonymisers renumber freely. An enhanced multi-frame
CT (one file, one frame per slice, geometry in its functional groups) is read the same
way, frame by frame. The volume geometry
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
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from fedseg_clinic.errors import FedsegError

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
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
    image_type: tuple[str, ...] = ()
    orientation: tuple[float, ...] | None = None
    position: tuple[float, ...] | None = None
    rows: int = 0
    columns: int = 0
    frames: int = 1
    pixel_spacing: tuple[float, ...] | None = None
    frame_positions: list[tuple[float, ...]] = dataclasses.field(default_factory=list)

    def normal(self) -> np.ndarray | None:
        """Unit slice normal from ImageOrientationPatient (None when absent or broken)."""
        if self.orientation is None:
            return None
        row, col = np.asarray(self.orientation[:3]), np.asarray(self.orientation[3:])
        normal = np.cross(row, col)
        norm = float(np.linalg.norm(normal))
        return normal / norm if norm > 0.5 else None

    def along_normal(self) -> float | None:
        """Position of the slice along its normal (mm), None when unknown."""
        normal = self.normal()
        if normal is None or self.position is None:
            return None
        return float(np.asarray(self.position) @ normal)


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
        sop_uids: SOPInstanceUID of each slice, in array z order (one UID repeated
            for the frames of an enhanced multi-frame CT).
        files: file of each slice, in array z order.
        hu: float32 (z, y, x) Hounsfield units (RescaleSlope/Intercept applied).
        geometry: the voxel grid.
        warnings: problems that did not stop the read (one line each, naming the file).
        frame_numbers: 1-based frame of each slice in a multi-frame file (None for a
            single-frame file), in array z order.
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
    frame_numbers: list[int | None] = dataclasses.field(default_factory=list)


_LABELMAP_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz")


def _is_dicom_candidate(path: Path) -> bool:
    name = path.name.lower()
    return not any(name.endswith(s) for s in _LABELMAP_SUFFIXES)


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    """Return n finite floats of a multi-valued DICOM element, or None if it is not that."""
    try:
        values = tuple(float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    return values if len(values) == n and all(np.isfinite(values)) else None


def _frame_item(ds: pydicom.Dataset, frame: int, sequence: str) -> pydicom.Dataset | None:
    """A functional group macro of one frame: per-frame first, else the shared one."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame),
                          ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items is not None and len(items) > index and sequence in items[index]:
            inner = items[index].get(sequence)
            if inner:
                return inner[0]
    return None


def _header_geometry(ds: pydicom.Dataset, item: DicomFile) -> None:
    """Orientation, position, size and frame count from a header (best effort)."""
    item.rows = int(ds.get("Rows") or 0)
    item.columns = int(ds.get("Columns") or 0)
    item.frames = int(ds.get("NumberOfFrames") or 1)
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        orient = _frame_item(ds, 0, "PlaneOrientationSequence")
        measures = _frame_item(ds, 0, "PixelMeasuresSequence")
        item.orientation = _floats(orient.get("ImageOrientationPatient"), 6) if orient else None
        item.pixel_spacing = _floats(measures.get("PixelSpacing"), 2) if measures else None
        for k in range(item.frames):
            position = _frame_item(ds, k, "PlanePositionSequence")
            xyz = _floats(position.get("ImagePositionPatient"), 3) if position else None
            if xyz is None:
                item.frame_positions = []
                break
            item.frame_positions.append(xyz)
        item.position = item.frame_positions[0] if item.frame_positions else None
    else:
        item.orientation = _floats(ds.get("ImageOrientationPatient"), 6)
        item.position = _floats(ds.get("ImagePositionPatient"), 3)
        item.pixel_spacing = _floats(ds.get("PixelSpacing"), 2)
        item.frame_positions = [item.position] if item.position is not None else []


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
        item.image_type = tuple(image_type)
        if modality == "CT":
            _header_geometry(ds, item)
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
    files and folders are ignored; symbolic links to folders and files are followed,
    each real folder and file read once.

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
    # Symlinked folders are followed (clinics link patient folders from elsewhere); a
    # folder or file reached twice (two links, or a link loop) is read once only.
    seen_dirs: set[Path] = {src.resolve()}
    seen_files: set[Path] = set()
    for root, dirs, names in os.walk(src, followlinks=True):
        kept = []
        for d in sorted(dirs):
            real = (Path(root) / d).resolve()
            if d.startswith(".") or real in excluded or real in seen_dirs:
                continue
            seen_dirs.add(real)
            kept.append(d)
        dirs[:] = kept
        for name in sorted(names):
            path = Path(root) / name
            if name.startswith("."):
                continue
            real = path.resolve()
            if real in seen_files:
                continue
            seen_files.add(real)
            if not path.exists():
                skipped.append((path, "broken symbolic link"))
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


def _vector(ds: pydicom.Dataset, keyword: str, n: int, path: object) -> np.ndarray:
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


def transfer_syntax_label(uid: str) -> str:
    """"JPEG-LS Lossless Image Compression (1.2.840.10008.1.2.4.80)", or the bare UID."""
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


def check_decodable(ds: pydicom.Dataset, path: Path) -> None:
    """Refuse pixel data that no installed decoder reads, in one line.

    pydicom decodes the native syntaxes and RLE itself; JPEG (lossless and lossy),
    JPEG-LS, JPEG 2000 and HTJ2K need the pinned pylibjpeg plugins (pyjpegls and Pillow
    are fallbacks). Anything else (MPEG/HEVC video, JPEG XL, a private syntax) is refused
    naming the file and the syntax before any decoding is tried.

    Raises:
        FedsegError: naming the file and the transfer syntax.
    """
    meta = getattr(ds, "file_meta", None)
    raw = meta.get("TransferSyntaxUID") if meta is not None else None
    if raw is None:
        return  # pydicom guesses native little endian for files without a meta header
    uid = UID(str(raw))
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        raise FedsegError(f"{path}: transfer syntax {transfer_syntax_label(uid)} cannot be "
                          f"decoded (no pixel data decoder in pydicom {pydicom.__version__}); "
                          "re-export the series uncompressed") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin"
        raise FedsegError(f"{path}: transfer syntax {transfer_syntax_label(uid)} cannot be "
                          f"decoded: no installed decoder plugin ({missing})")


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (decoders raise multi-line texts)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _rescale(item: pydicom.Dataset, where: object) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept of a slice, checked to be finite."""
    values = {}
    for keyword, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        raw = item.get(keyword)
        try:
            values[keyword] = default if raw is None or raw == "" else float(raw)
        except (TypeError, ValueError):
            raise FedsegError(f"{where}: malformed {keyword} {raw!r}") from None
        if not np.isfinite(values[keyword]):
            # NaN would become 0 HU after the int16 cast: refuse instead of importing noise.
            raise FedsegError(f"{where}: {keyword} is {raw!r}, not a finite number")
    slope, intercept = values["RescaleSlope"], values["RescaleIntercept"]
    if slope == 0:
        raise FedsegError(f"{where}: RescaleSlope is 0 (every voxel would be "
                          f"{intercept:g} HU)")
    return slope, intercept


@dataclasses.dataclass
class _Slice:
    """One slice: a single-frame file or one frame of a multi-frame file."""

    where: str  # the file, or "FILE frame K", for messages
    path: Path
    frame: int | None  # 0-based frame index in a multi-frame file
    orient: np.ndarray
    spacing: np.ndarray
    position: np.ndarray
    sop_uid: str
    slope: float
    intercept: float
    thickness: object  # SpacingBetweenSlices or SliceThickness as written (may be None)


def _is_multiframe(ds: pydicom.Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or int(ds.get("NumberOfFrames") or 1) > 1


def _file_slices(path: Path, ds: pydicom.Dataset) -> list[_Slice]:
    """The slices of one file (one, or one per frame of an enhanced multi-frame CT)."""
    if not _is_multiframe(ds):
        slope, intercept = _rescale(ds, path)
        return [_Slice(
            where=str(path), path=path, frame=None,
            orient=_vector(ds, "ImageOrientationPatient", 6, path),
            spacing=_vector(ds, "PixelSpacing", 2, path),
            position=_vector(ds, "ImagePositionPatient", 3, path),
            sop_uid=str(ds.get("SOPInstanceUID", "")), slope=slope, intercept=intercept,
            thickness=ds.get("SpacingBetweenSlices") or ds.get("SliceThickness"),
        )]
    frames = int(ds.get("NumberOfFrames") or 1)
    slices = []
    for k in range(frames):
        where = f"{path} frame {k + 1}"
        groups = {}
        for sequence in ("PlaneOrientationSequence", "PlanePositionSequence",
                         "PixelMeasuresSequence"):
            item = _frame_item(ds, k, sequence)
            if item is None:
                raise FedsegError(f"{where}: multi-frame CT without {sequence} (not an "
                                  "enhanced CT with per-frame geometry)")
            groups[sequence] = item
        transform = _frame_item(ds, k, "PixelValueTransformationSequence")
        slope, intercept = _rescale(transform if transform is not None else ds, where)
        measures = groups["PixelMeasuresSequence"]
        slices.append(_Slice(
            where=where, path=path, frame=k,
            orient=_vector(groups["PlaneOrientationSequence"], "ImageOrientationPatient", 6,
                           where),
            spacing=_vector(measures, "PixelSpacing", 2, where),
            position=_vector(groups["PlanePositionSequence"], "ImagePositionPatient", 3, where),
            sop_uid=str(ds.get("SOPInstanceUID", "")), slope=slope, intercept=intercept,
            thickness=measures.get("SpacingBetweenSlices") or measures.get("SliceThickness"),
        ))
    return slices


def _decode_file(path: Path, frames: bool) -> np.ndarray:
    """Stored pixel values of one file: (rows, cols), or (frames, rows, cols)."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - unreadable file is the user's input
        raise FedsegError(f"{path}: cannot read DICOM ({_one_line(exc)})") from None
    check_decodable(ds, path)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoders raise anything on bad data
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        label = f" ({transfer_syntax_label(str(syntax))})" if syntax else ""
        raise FedsegError(f"{path}: cannot decode pixel data{label}: {_one_line(exc)}") from None
    if frames and pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.ndim != (3 if frames else 2):
        raise FedsegError(f"{path}: expected grey-level {'frames' if frames else 'one frame'}, "
                          f"got pixel shape {pixels.shape} (colour CT is not supported)")
    return pixels


def _check_spacing(positions: np.ndarray, files: Sequence[object]) -> float:
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
        files: the files of one SeriesInstanceUID, in any order: single-frame CT slices
            and/or enhanced multi-frame CT files (every frame is a slice).

    Returns:
        The series with slices ordered along the slice normal.

    Raises:
        FedsegError: naming the file (and frame), for undecodable pixels (an unsupported
            transfer syntax is named), inconsistent orientation, pixel spacing or size,
            duplicated or missing slices, or uneven spacing.
    """
    if not files:
        raise FedsegError("empty CT series")
    slices: list[_Slice] = []
    first_header: pydicom.Dataset | None = None
    for path in files:
        try:
            # Headers first; pixels are read one file at a time below to bound memory.
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - unreadable file is the user's input
            raise FedsegError(f"{path}: cannot read DICOM ({_one_line(exc)})") from None
        first_header = first_header or ds
        slices.extend(_file_slices(path, ds))
    assert first_header is not None
    first = slices[0]
    row, col = first.orient[:3], first.orient[3:]
    normal = np.cross(row, col)
    if not 0.99 < np.linalg.norm(normal) < 1.01 or abs(float(row @ col)) > 1e-3:
        raise FedsegError(f"{first.where}: ImageOrientationPatient is not two orthogonal "
                          f"unit vectors: {list(first.orient)}")
    for item in slices:
        if not np.all(item.spacing > 0):
            # A zero spacing makes the voxel-to-patient matrix singular.
            raise FedsegError(f"{item.where}: PixelSpacing must be two positive numbers, got ["
                              + ", ".join(f"{v:g}" for v in item.spacing) + "]")
        if not np.allclose(item.orient, first.orient, atol=1e-4):
            raise FedsegError(f"{item.where}: ImageOrientationPatient differs from "
                              f"{first.where}")
        if not np.allclose(item.spacing, first.spacing, rtol=1e-4, atol=1e-5):
            raise FedsegError(f"{item.where}: PixelSpacing differs from {first.where}")
    slices.sort(key=lambda s: float(s.position @ normal))
    positions = np.asarray([float(s.position @ normal) for s in slices])
    labels = [s.where for s in slices]
    warnings: list[str] = []
    if len(slices) > 1:
        dz = _check_spacing(positions, labels)
    else:
        thickness = slices[0].thickness
        try:
            dz = float(thickness) if thickness else 1.0  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise FedsegError(f"{labels[0]}: malformed slice thickness "
                              f"{thickness!r}") from None
        if not (np.isfinite(dz) and dz > 0):
            raise FedsegError(f"{labels[0]}: slice thickness {thickness!r} is not a "
                              "positive number")
        if not thickness:
            warnings.append(f"{labels[0]}: single slice without SliceThickness; "
                            "z spacing set to 1 mm")
    # Positions must also line up along the normal: an in-plane shift breaks the grid.
    origin = slices[0].position
    for pos_along, item in zip(positions[1:], slices[1:], strict=True):
        offset = item.position - origin - normal * (pos_along - positions[0])
        if np.linalg.norm(offset) > max(0.1, 0.05 * dz):
            raise FedsegError(f"{item.where}: slice is shifted in-plane by "
                              f"{np.linalg.norm(offset):.2f} mm relative to {labels[0]}")
    volume: np.ndarray | None = None
    decoded: tuple[Path, np.ndarray] | None = None  # the last multi-frame file decoded
    for k, item in enumerate(slices):
        if item.frame is None:
            pixels = _decode_file(item.path, frames=False)
        else:
            if decoded is None or decoded[0] != item.path:
                decoded = (item.path, _decode_file(item.path, frames=True))
            if item.frame >= decoded[1].shape[0]:
                raise FedsegError(f"{item.where}: the pixel data holds only "
                                  f"{decoded[1].shape[0]} frame(s)")
            pixels = decoded[1][item.frame]
        hu = pixels.astype(np.float32) * np.float32(item.slope) + np.float32(item.intercept)
        if volume is None:
            volume = np.empty((len(slices), *hu.shape), dtype=np.float32)
        elif hu.shape != volume.shape[1:]:
            raise FedsegError(f"{item.where}: slice size {hu.shape} differs from "
                              f"{volume.shape[1:]}")
        volume[k] = hu
    assert volume is not None
    direction = np.stack([first.orient[:3], first.orient[3:], normal], axis=1)
    geometry = Geometry(
        shape=(int(volume.shape[0]), int(volume.shape[1]), int(volume.shape[2])),
        spacing=(float(dz), float(first.spacing[0]), float(first.spacing[1])),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        direction=tuple(tuple(float(v) for v in r) for r in direction),  # type: ignore[misc]
    )
    return CtSeries(
        series_uid=str(first_header.get("SeriesInstanceUID", "")),
        study_uid=str(first_header.get("StudyInstanceUID", "")),
        patient_id=str(first_header.get("PatientID", "")),
        frame_of_reference_uid=str(first_header.get("FrameOfReferenceUID", "")),
        sop_uids=[s.sop_uid for s in slices],
        files=[s.path for s in slices],
        hu=volume,
        geometry=geometry,
        warnings=warnings,
        frame_numbers=[None if s.frame is None else s.frame + 1 for s in slices],
    )
