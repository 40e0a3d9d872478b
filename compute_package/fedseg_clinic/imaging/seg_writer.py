"""Write predicted organ masks as a DICOM Segmentation (SEG) with highdicom.

highdicom builds a standard-conformant BINARY SEG from the source CT datasets: one frame
per (slice, segment) that is not empty, each referencing its source slice, the CT's
frame of reference and study. Every organ is one segment: its label is the organ's
clinical name, its category "Anatomical Structure" and its type the organ's SNOMED CT
code (laterality is in the label: "Parotid_L"), algorithm type AUTOMATIC.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.organs import OrganSet

# organ -> SNOMED CT (code, meaning) of the segmented property type.
SNOMED: dict[str, tuple[str, str]] = {
    "body": ("38266002", "Entire body"),
    "lung_left": ("44029006", "Left lung"),
    "lung_right": ("3341006", "Right lung"),
    "heart": ("80891009", "Heart"),
    "spinal_cord": ("2748008", "Spinal cord"),
    "esophagus": ("32849002", "Esophagus"),
    "brainstem": ("15926001", "Brainstem"),
    "parotid_left": ("45289007", "Parotid gland"),
    "parotid_right": ("45289007", "Parotid gland"),
    "larynx": ("4596009", "Larynx"),
    "mandible": ("91609006", "Mandible"),
}
ANATOMICAL_STRUCTURE = ("91723000", "Anatomical Structure")


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("fedseg")
    except metadata.PackageNotFoundError:  # the compute package runs without fedseg
        return "unknown"


def build_seg(masks: Mapping[str, np.ndarray], organs: OrganSet,
              ct_files: Sequence[Path],
              frame_numbers: Sequence[int | None] | None = None) -> Any:
    """A highdicom Segmentation of organ masks on a CT series.

    Args:
        masks: organ -> bool (z, y, x) on the series' grid, z in ``ct_files`` order;
            only non-empty masks (a SEG segment needs at least one frame).
        organs: the organ set (names, order).
        ct_files: the series' slice files in array z order.
        frame_numbers: for an enhanced (multi-frame) CT, each slice's 1-based frame in
            its file, in array z order; the SEG then has the one multi-frame image as
            its source and one frame per source frame (highdicom takes a single
            multi-frame source image, so a CT split over several such files is refused).

    Raises:
        FedsegError: no organ to write, or a CT highdicom cannot reference.
    """
    import highdicom as hd
    import pydicom

    version = _version()
    present = [o for o in organs.organs if o in masks and np.any(masks[o])]
    if not present:
        raise FedsegError(f"{ct_files[0].parent}: no organ was found; a SEG needs one segment")
    multi_frame = frame_numbers is not None and any(f is not None for f in frame_numbers)
    files = list(dict.fromkeys(ct_files)) if multi_frame else list(ct_files)
    if multi_frame and len(files) > 1:
        raise FedsegError(f"{files[0]}: --format seg on a CT split over {len(files)} "
                          "multi-frame files is not supported (use --format nifti)")
    try:
        sources = [pydicom.dcmread(f) for f in files]
    except Exception as exc:  # noqa: BLE001 - the input's problem
        raise FedsegError(f"{ct_files[0].parent}: cannot read the CT slices ({exc})") from None
    algorithm = hd.AlgorithmIdentificationSequence(
        name="fedseg", version=str(version),
        family=hd.sr.CodedConcept("123109", "DCM", "Artificial Intelligence"))
    descriptions = []
    for number, organ in enumerate(present, start=1):
        code, meaning = SNOMED[organ]
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=organs.clinical_names[organ],
            segmented_property_category=hd.sr.CodedConcept(ANATOMICAL_STRUCTURE[0], "SCT",
                                                            ANATOMICAL_STRUCTURE[1]),
            segmented_property_type=hd.sr.CodedConcept(code, "SCT", meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        ))
    pixels = np.stack([np.asarray(masks[o], dtype=bool) for o in present], axis=-1)
    if multi_frame:
        # highdicom wants the source's frame order; frames off the volume stay empty.
        by_frame = np.zeros((int(sources[0].get("NumberOfFrames", 1)), *pixels.shape[1:]),
                            dtype=bool)
        for k, frame in enumerate(frame_numbers or []):
            by_frame[int(frame) - 1] = pixels[k]
        pixels = by_frame
    try:
        return hd.seg.Segmentation(
            source_images=sources,
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=2,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="fedseg",
            manufacturer_model_name=f"fedseg {organs.key}",
            software_versions=str(version),
            device_serial_number="0",
            series_description=f"fedseg {organs.key}",
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise FedsegError(f"{ct_files[0].parent}: cannot build a DICOM SEG on this CT "
                          f"({type(exc).__name__}: {exc})") from None


def write_seg(seg: Any, path: Path) -> Path:
    """Write a SEG atomically (temporary sibling + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        seg.save_as(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
