"""Write predicted organ masks as a DICOM RTSTRUCT on the CT series they were predicted on.

What a treatment planning system needs to attach the structure set to the right images:

- the CT's patient and study attributes (PatientName/ID, StudyInstanceUID, ...), copied
  from the first slice, so the RTSTRUCT lands in the same patient and study;
- ``ReferencedFrameOfReferenceSequence`` -> the CT's FrameOfReferenceUID, its study and
  series, and every slice's SOPInstanceUID (``ContourImageSequence``);
- one ROI per organ (``StructureSetROISequence``: number, name - the organ's clinical
  name -, frame of reference, generation algorithm AUTOMATIC), its display colour and
  contours (``ROIContourSequence``), and its type (``RTROIObservationsSequence``: ORGAN);
- each contour CLOSED_PLANAR on one slice, referencing that slice's SOPInstanceUID.

Contours are traced per slice by marching squares (contourpy) at level 0.5 on the mask
padded by one voxel, so every line is closed and runs half way between inside and outside
voxel centres: an even-odd fill of the polygons (rtstruct.fill_polygons_even_odd, what the
importer does) gives back exactly the voxels of the mask, holes included.

The file is written to a temporary name and renamed. Approval status is UNAPPROVED: a
clinician reviews automatic contours before they are used for planning.
"""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.imaging.series import CT_IMAGE_STORAGE, RTSTRUCT_STORAGE, Geometry
from fedseg_clinic.organs import OrganSet

logger = logging.getLogger(__name__)

# Attributes copied from the CT so the structure set joins the same patient and study.
_COPIED: tuple[str, ...] = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "StudyDescription",
    "AccessionNumber", "ReferringPhysicianName", "SpecificCharacterSet",
)
DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed contours of a 2-D boolean mask, as (n, 2) arrays of (column, row) indices.

    Each contour is open-ended (its first point is not repeated), at least 3 points long.
    """
    import contourpy

    if not mask.any():
        return []
    padded = np.pad(mask.astype(np.float64), 1)
    generator = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
    contours = []
    for line in generator.lines(0.5):
        points = np.asarray(line, dtype=np.float64) - 1.0  # undo the padding
        if len(points) > 1 and np.allclose(points[0], points[-1]):
            points = points[:-1]
        if len(points) >= 3:
            contours.append(points)
    return contours


def _contour_lps(points: np.ndarray, k: int, geometry: Geometry) -> np.ndarray:
    """(n, 2) (column, row) indices on slice k -> (n, 3) LPS mm."""
    zyx = np.column_stack([np.full(len(points), float(k)), points[:, 1], points[:, 0]])
    return geometry.index_to_lps(zyx)


def build_rtstruct(
    masks: Mapping[str, np.ndarray],
    organs: OrganSet,
    geometry: Geometry,
    ct_files: Sequence[Path],
    sop_uids: Sequence[str],
    series_uid: str,
    frame_of_reference_uid: str,
    label: str = "fedseg",
    description: str = "fedseg automatic segmentation",
    frame_numbers: Sequence[int | None] | None = None,
) -> Dataset:
    """An RTSTRUCT dataset of organ masks on a CT series' grid.

    Args:
        masks: organ -> bool (z, y, x) mask on the series' grid; organs in ``organs``.
        organs: the organ set (ROI names, colours, order).
        geometry: the CT series' grid.
        ct_files: the slice files in array z order (the first gives patient/study).
        sop_uids: each slice's SOPInstanceUID in array z order.
        series_uid: the CT's SeriesInstanceUID.
        frame_of_reference_uid: the CT's FrameOfReferenceUID.
        label: StructureSetLabel (at most 16 characters).
        description: SeriesDescription.
        frame_numbers: for an enhanced (multi-frame) CT, each slice's 1-based frame in
            its file, in array z order; every image reference then names its frame
            (ReferencedFrameNumber) and the CT's own SOP class.

    Raises:
        FedsegError: for masks off the grid, unknown organs or a missing frame of reference.
    """
    nz = geometry.shape[0]
    if len(sop_uids) != nz or len(ct_files) != nz:
        raise FedsegError(f"RTSTRUCT: {len(sop_uids)} slice UIDs for {nz} slices")
    if not frame_of_reference_uid:
        raise FedsegError(f"{ct_files[0]}: CT has no FrameOfReferenceUID; an RTSTRUCT cannot "
                          "reference it (use --format nifti)")
    for organ, mask in masks.items():
        if organ not in organs.organs:
            raise FedsegError(f"RTSTRUCT: organ {organ!r} is not in organ set {organs.name}")
        if tuple(mask.shape) != tuple(geometry.shape):
            raise FedsegError(f"RTSTRUCT: mask {organ} shape {mask.shape} != CT "
                              f"{geometry.shape}")
    try:
        ct = pydicom.dcmread(ct_files[0], stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - any read failure is the input's problem
        raise FedsegError(f"{ct_files[0]}: cannot read CT header ({exc})") from None

    now = datetime.datetime.now(datetime.UTC)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    for keyword in _COPIED:
        if keyword in ct:
            setattr(ds, keyword, ct.data_element(keyword).value)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyDate", "StudyTime", "StudyID", "AccessionNumber",
                    "ReferringPhysicianName"):
        if keyword not in ds:
            setattr(ds, keyword, "")  # type 2: present, may be empty
    ds.StudyInstanceUID = ct.get("StudyInstanceUID", "") or generate_uid()
    ds.SOPClassUID = RTSTRUCT_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.SeriesDescription = description[:64]
    ds.InstanceNumber = 1
    ds.Manufacturer = "fedseg"
    ds.OperatorsName = ""
    ds.StructureSetLabel = label[:16]
    ds.StructureSetName = label[:64]
    ds.StructureSetDate = ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.StructureSetTime = ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.ApprovalStatus = "UNAPPROVED"

    frames = list(frame_numbers) if frame_numbers is not None else [None] * nz
    if len(frames) != nz:
        raise FedsegError(f"RTSTRUCT: {len(frames)} frame numbers for {nz} slices")
    image_class = str(ct.get("SOPClassUID", "") or CT_IMAGE_STORAGE)

    def slice_ref(k: int) -> Dataset:
        item = Dataset()
        item.ReferencedSOPClassUID = image_class
        item.ReferencedSOPInstanceUID = sop_uids[k]
        if frames[k] is not None:
            item.ReferencedFrameNumber = int(frames[k])
        return item

    series_item = Dataset()
    series_item.SeriesInstanceUID = series_uid
    series_item.ContourImageSequence = DicomSequence([slice_ref(k) for k in range(nz)])
    study_item = Dataset()
    study_item.ReferencedSOPClassUID = DETACHED_STUDY_MANAGEMENT
    study_item.ReferencedSOPInstanceUID = ds.StudyInstanceUID
    study_item.RTReferencedSeriesSequence = DicomSequence([series_item])
    frame_item = Dataset()
    frame_item.FrameOfReferenceUID = frame_of_reference_uid
    frame_item.RTReferencedStudySequence = DicomSequence([study_item])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_item])

    rois, roi_contours, observations = [], [], []
    for number, organ in enumerate([o for o in organs.organs if o in masks], start=1):
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_of_reference_uid
        roi.ROIName = organs.clinical_names[organ]
        roi.ROIDescription = f"fedseg {organs.key}: {organ}"
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        rois.append(roi)
        contours = []
        mask = np.asarray(masks[organ], dtype=bool)
        for k in np.flatnonzero(mask.any(axis=(1, 2))):
            for points in slice_contours(mask[k]):
                lps = _contour_lps(points, int(k), geometry)
                contour = Dataset()
                contour.ContourImageSequence = DicomSequence([slice_ref(int(k))])
                contour.ContourGeometricType = "CLOSED_PLANAR"
                contour.NumberOfContourPoints = len(lps)
                # Decimal strings hold 16 characters: 0.01 mm is far below a voxel.
                contour.ContourData = [f"{v:.2f}" for v in lps.ravel()]
                contours.append(contour)
        item = Dataset()
        item.ROIDisplayColor = list(organs.colours[organ])
        item.ReferencedROINumber = number
        if contours:
            item.ContourSequence = DicomSequence(contours)
        roi_contours.append(item)
        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = "ORGAN"
        observation.ROIInterpreter = ""
        observations.append(observation)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(roi_contours)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    return ds


def write_dicom(ds: Dataset, path: Path) -> Path:
    """Write a DICOM dataset atomically (temporary sibling + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
