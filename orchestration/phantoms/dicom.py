"""Write a case as DICOM: axial CT Image Storage slices plus one RTSTRUCT.

Used by the phantom generator so that the DICOM importer can be exercised on data whose
truth is known. Geometry: ImageOrientationPatient is axial (1,0,0,0,1,0); slice k sits
at ``origin + k * dz`` along z; PixelSpacing is (row spacing = dy, column spacing = dx);
pixels are stored unsigned as HU + 1024 with RescaleIntercept -1024, RescaleSlope 1.
Every UID (study, series, frame of reference, SOP instances) is derived from a seed
string with :func:`pydicom.uid.generate_uid`'s ``entropy_srcs``, so the same seed gives
the same files.

Contours: for each axial slice and organ the mask is padded with background and traced
at the 0.5 level with ``contourpy`` (matplotlib's contouring engine), giving one closed
line per boundary: each connected region's outer boundary and each hole are separate
CLOSED_PLANAR contours. On a binary image the 0.5 level runs exactly half-way between
an inside and an outside pixel centre, never through one, so filling the contours by
the even-odd rule and testing pixel centres gives back exactly the mask. Collinear
points (straight runs along pixel edges) are dropped; that does not change the polygon.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import contourpy
import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fedseg_clinic.cases import Case
from fedseg_clinic.errors import FedsegError

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
# The SOP class RTSTRUCTs conventionally cite for the referenced study.
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"
HU_STORE_OFFSET = 1024
CONTOUR_DATA_TAG = Tag(0x3006, 0x0050)
# A fixed acquisition date keeps the files byte-identical for a seed.
STUDY_DATE = "20260101"
STUDY_TIME = "120000"

# ROI naming conventions seen in clinics; all are in organs.DEFAULT_ALIASES.
ROI_NAMES: dict[str, dict[str, str]] = {
    "aapm": {"body": "Body", "lung_left": "Lung_L", "lung_right": "Lung_R",
             "heart": "Heart", "spinal_cord": "SpinalCord", "esophagus": "Esophagus"},
    "upper": {"body": "EXTERNAL", "lung_left": "LUNG_LT", "lung_right": "LUNG_RT",
              "heart": "HEART", "spinal_cord": "SPINAL_CORD", "esophagus": "ESOPHAGUS"},
    "short": {"body": "Outline", "lung_left": "Lt Lung", "lung_right": "Rt Lung",
              "heart": "Heart", "spinal_cord": "Cord", "esophagus": "Oesophagus"},
}
ROI_COLORS: dict[str, tuple[int, int, int]] = {
    "body": (0, 255, 0), "lung_left": (0, 128, 255), "lung_right": (255, 128, 0),
    "heart": (255, 0, 0), "spinal_cord": (255, 255, 0), "esophagus": (160, 0, 255),
}


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters (DICOM DS)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text[:16]


def mask_to_contours(mask: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> list[np.ndarray]:
    """Closed boundary polygons of a 2-D mask in patient coordinates.

    Args:
        mask: bool (ny, nx) slice.
        xs: x coordinate (mm) of each column's pixel centre, increasing.
        ys: y coordinate (mm) of each row's pixel centre, increasing.

    Returns:
        One (n, 2) float64 array of (x, y) points per boundary (outer boundaries and
        holes alike), not repeating the first point; even-odd filling reproduces the mask
        at pixel centres.
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return []
    dx = float(xs[1] - xs[0]) if len(xs) > 1 else 1.0
    dy = float(ys[1] - ys[0]) if len(ys) > 1 else 1.0
    # Trace only the mask's bounding box (most organs are small), padded with background
    # so every boundary closes inside the traced grid.
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    z = np.pad(mask[r0:r1, c0:c1], 1).astype(np.float64)
    xb, yb = np.asarray(xs[c0:c1], dtype=np.float64), np.asarray(ys[r0:r1], dtype=np.float64)
    xp = np.concatenate([[xb[0] - dx], xb, [xb[-1] + dx]])
    yp = np.concatenate([[yb[0] - dy], yb, [yb[-1] + dy]])
    gen = contourpy.contour_generator(xp, yp, z, name="serial",
                                      line_type=contourpy.LineType.Separate)
    polygons = []
    for line in gen.lines(0.5):
        points = np.asarray(line, dtype=np.float64)
        if len(points) > 1 and np.array_equal(points[0], points[-1]):
            points = points[:-1]
        points = _drop_collinear(points)
        if len(points) >= 3:
            polygons.append(points)
    return polygons


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """Remove vertices lying on the straight line through their neighbours."""
    if len(points) < 4:
        return points
    before = points - np.roll(points, 1, axis=0)
    after = np.roll(points, -1, axis=0) - points
    cross = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    scale = np.abs(before).max() * np.abs(after).max() + 1e-12
    return points[np.abs(cross) > 1e-9 * scale]


def _contour_data(polygon: np.ndarray, z_text: str) -> RawDataElement:
    """ContourData as an already-encoded element.

    pydicom validates every DS value one by one (about 20 us each); contours hold tens
    of thousands of them per patient, so they are encoded here once, as the
    backslash-separated text the standard defines, padded to even length.
    """
    text = "\\".join(f"{_ds(px)}\\{_ds(py)}\\{z_text}" for px, py in polygon)
    raw = text.encode("ascii")
    if len(raw) % 2:
        raw += b" "
    if len(raw) > 0xFFFE:
        raise FedsegError(f"contour of {len(polygon)} points is too long for one DICOM DS "
                          "element (use a smaller size)")
    return RawDataElement(CONTOUR_DATA_TAG, "DS", len(raw), raw, 0, False, True)


def _uid(seed: str, case_id: str, role: str) -> str:
    return generate_uid(entropy_srcs=[seed, case_id, role])


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _patient_study(ds: pydicom.Dataset, case: Case, study_uid: str) -> None:
    ds.PatientName = f"Phantom^{case.meta.case_id}"
    ds.PatientID = case.meta.case_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = STUDY_DATE
    ds.StudyTime = STUDY_TIME
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "fedseg synthetic thorax"
    ds.Manufacturer = "fedseg phantom generator"


def _check_geometry(case: Case) -> None:
    if not np.allclose(case.meta.direction, np.eye(3).ravel()):
        raise FedsegError(
            f"case {case.meta.case_id}: only axial identity direction can be written as "
            f"DICOM, got {case.meta.direction}"
        )
    if case.image.min() < -HU_STORE_OFFSET or case.image.max() > 65535 - HU_STORE_OFFSET:
        raise FedsegError(f"case {case.meta.case_id}: HU values outside the storable range")


def write_case_dicom(case: Case, folder: Path, uid_seed: str, roi_style: str = "aapm",
                     roi_names: Mapping[str, str] | None = None) -> list[Path]:
    """Write a case as CT slices ``CT.0001.dcm ...`` and ``RS.dcm`` into ``folder``.

    The folder is built under a temporary name and renamed into place.

    Args:
        case: the case (identity direction; origin = centre of voxel (0, 0, 0)).
        folder: destination folder; must not exist yet.
        uid_seed: seed string for the UIDs (same seed -> same UIDs).
        roi_style: a key of ROI_NAMES, used unless ``roi_names`` is given.
        roi_names: organ -> ROI name override.

    Returns:
        The written files, CT slices in z order then the RTSTRUCT.
    """
    _check_geometry(case)
    if roi_names is None:
        if roi_style not in ROI_NAMES:
            raise FedsegError(f"roi style {roi_style!r} unknown (choose from "
                              f"{', '.join(ROI_NAMES)})")
        roi_names = ROI_NAMES[roi_style]
    if folder.exists():
        raise FedsegError(f"{folder}: DICOM output folder already exists")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        names = _write_into(case, tmp, uid_seed, roi_names)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [folder / n for n in names]


def _write_into(case: Case, folder: Path, seed: str, roi_names: Mapping[str, str]
                ) -> list[str]:
    meta = case.meta
    cid = meta.case_id
    nz, ny, nx = case.image.shape
    dz, dy, dx = (float(v) for v in meta.spacing)
    ox, oy, oz = (float(v) for v in meta.origin)
    study_uid = _uid(seed, cid, "study")
    series_uid = _uid(seed, cid, "ct-series")
    frame_uid = _uid(seed, cid, "frame-of-reference")
    sop_uids = [_uid(seed, cid, f"ct-{k}") for k in range(nz)]
    stored = (case.image.astype(np.int32) + HU_STORE_OFFSET).astype(np.uint16)
    # Attributes shared by all slices are validated once; each slice copies them.
    common = pydicom.Dataset()
    common.SOPClassUID = CT_IMAGE_STORAGE
    common.Modality = "CT"
    common.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    _patient_study(common, case, study_uid)
    common.SeriesInstanceUID = series_uid
    common.SeriesNumber = 1
    common.SeriesDescription = "phantom CT"
    common.FrameOfReferenceUID = frame_uid
    common.PositionReferenceIndicator = ""
    common.AcquisitionNumber = 1
    common.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    common.PixelSpacing = [_ds(dy), _ds(dx)]
    common.SliceThickness = _ds(dz)
    common.KVP = "120"
    common.SamplesPerPixel = 1
    common.PhotometricInterpretation = "MONOCHROME2"
    common.Rows = ny
    common.Columns = nx
    common.BitsAllocated = 16
    common.BitsStored = 16
    common.HighBit = 15
    common.PixelRepresentation = 0
    common.RescaleIntercept = str(-HU_STORE_OFFSET)
    common.RescaleSlope = "1"
    common.RescaleType = "HU"
    common.WindowCenter = "40"
    common.WindowWidth = "400"
    names = []
    for k in range(nz):
        ds = pydicom.Dataset(dict(common.items()))
        ds.file_meta = _file_meta(CT_IMAGE_STORAGE, sop_uids[k])
        ds.SOPInstanceUID = sop_uids[k]
        ds.InstanceNumber = k + 1
        z_mm = oz + k * dz
        ds.ImagePositionPatient = [_ds(ox), _ds(oy), _ds(z_mm)]
        ds.SliceLocation = _ds(z_mm)
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        name = f"CT.{k + 1:04d}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
        names.append(name)

    xs = ox + np.arange(nx) * dx
    ys = oy + np.arange(ny) * dy
    rs = _rtstruct(case, seed, study_uid, series_uid, frame_uid, sop_uids, xs, ys,
                   roi_names)
    rs.save_as(folder / "RS.dcm", enforce_file_format=True)
    names.append("RS.dcm")
    return names


def _rtstruct(case: Case, seed: str, study_uid: str, ct_series_uid: str, frame_uid: str,
              sop_uids: Sequence[str], xs: np.ndarray, ys: np.ndarray,
              roi_names: Mapping[str, str]) -> pydicom.Dataset:
    meta = case.meta
    cid = meta.case_id
    oz, dz = float(meta.origin[2]), float(meta.spacing[0])
    sop_uid = _uid(seed, cid, "rtstruct")
    ds = pydicom.Dataset()
    ds.file_meta = _file_meta(RTSTRUCT_STORAGE, sop_uid)
    ds.SOPClassUID = RTSTRUCT_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "RTSTRUCT"
    _patient_study(ds, case, study_uid)
    ds.SeriesInstanceUID = _uid(seed, cid, "rtstruct-series")
    ds.SeriesNumber = 2
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "phantom"
    ds.StructureSetName = "phantom organs"
    ds.StructureSetDate = STUDY_DATE
    ds.StructureSetTime = STUDY_TIME

    def image_ref(k: int) -> pydicom.Dataset:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = CT_IMAGE_STORAGE
        item.ReferencedSOPInstanceUID = sop_uids[k]
        return item

    series = pydicom.Dataset()
    series.SeriesInstanceUID = ct_series_uid
    series.ContourImageSequence = DicomSequence([image_ref(k) for k in range(len(sop_uids))])
    study = pydicom.Dataset()
    study.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study.ReferencedSOPInstanceUID = study_uid
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = pydicom.Dataset()
    frame.FrameOfReferenceUID = frame_uid
    frame.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])

    rois, contours, observations = [], [], []
    for number, organ in enumerate(meta.labelled_organs, start=1):
        mask = case.masks[organ]
        roi = pydicom.Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_uid
        roi.ROIName = roi_names.get(organ, organ)
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        rois.append(roi)

        roi_contour = pydicom.Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ROIDisplayColor = list(ROI_COLORS.get(organ, (255, 255, 255)))
        items = []
        for k in np.flatnonzero(mask.any(axis=(1, 2))):
            z_text = _ds(oz + int(k) * dz)
            for polygon in mask_to_contours(mask[k], xs, ys):
                item = pydicom.Dataset()
                item.ContourImageSequence = DicomSequence([image_ref(int(k))])
                item.ContourGeometricType = "CLOSED_PLANAR"
                item.NumberOfContourPoints = len(polygon)
                item.ContourNumber = len(items) + 1
                item[CONTOUR_DATA_TAG] = _contour_data(polygon, z_text)
                # Declares the item already encoded as written (explicit VR little
                # endian), so save_as copies the raw ContourData instead of decoding it.
                item.set_original_encoding(False, True, "iso8859")
                items.append(item)
        if items:
            roi_contour.ContourSequence = DicomSequence(items)
        contours.append(roi_contour)

        obs = pydicom.Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = "EXTERNAL" if organ == "body" else "ORGAN"
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    return ds

