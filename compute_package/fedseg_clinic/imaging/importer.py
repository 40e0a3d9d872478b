"""Import a clinic's DICOM folder into the case format (one case per patient study).

``import_clinic`` scans a folder (nested folders allowed), groups CT slices by
SeriesInstanceUID and series by patient study (PatientID + StudyInstanceUID), attaches
RTSTRUCTs (by their series / image / frame-of-reference references), DICOM SEGs (by their
referenced series or frame of reference) and label map files (NIfTI/NRRD beside or above
their series' files), rasterises the labels onto the CT grid,
preprocesses (crop to body, resample, HU clip) and writes each case atomically, then the
clinic's manifest.json.

Bad input never stops the other patients: every problem becomes one line in
``ImportReport.problems`` naming the file; a patient with an error is not written at all.
Case ids are pseudonyms: a salted hash of PatientID + StudyInstanceUID. The salt is kept
in ``CASES_DIR/.pseudonym-salt`` (created once), so re-imports give the same ids and the
ids cannot be recomputed from a PatientID without the clinic's salt.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import logging
import os
import secrets
import warnings
from pathlib import Path

import numpy as np

from fedseg_clinic.cases import (
    CASE_META_NAME,
    PRIVATE_DIR_MODE,
    PRIVATE_FILE_MODE,
    Case,
    CaseMeta,
    Manifest,
    assign_splits,
    manifest_entry,
    read_case_meta,
    write_case,
    write_manifest,
)
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.imaging import preprocess
from fedseg_clinic.imaging.labelmap import (
    DicomSeg,
    LabelMap,
    bounds_overlap,
    dicom_seg_to_grid,
    labelmap_to_grid,
    read_dicom_seg,
    read_labelmap,
)
from fedseg_clinic.imaging.matching import (
    Stack,
    choose_stack,
    match_structure_set,
    split_stacks,
)
from fedseg_clinic.imaging.rtstruct import (
    PLANE_TOLERANCE,
    StructureSet,
    check_reference,
    rasterise_roi,
    read_rtstruct,
)
from fedseg_clinic.imaging.series import (
    CtSeries,
    DicomFile,
    Geometry,
    ScanResult,
    read_series,
    scan_folder,
)
from fedseg_clinic.io import atomic_write_text
from fedseg_clinic.organs import DEFAULT_ORGAN_SET, AliasTable, organ_set

logger = logging.getLogger(__name__)

SALT_NAME = ".pseudonym-salt"
DEFAULT_LABELMAP_GLOBS: tuple[str, ...] = (
    "*seg*.nrrd", "*label*.nrrd", "*seg*.nii", "*seg*.nii.gz", "*label*.nii", "*label*.nii.gz",
)


@dataclasses.dataclass
class ImportOptions:
    """Settings of one import.

    Attributes:
        clinic: clinic name written into the manifest.
        spacing: target voxel size (z, y, x) in mm; None keeps each series' spacing.
        hu_clip: HU window (low, high) the image is clipped to.
        crop: crop each case to the body's bounding box.
        aliases: ROI name -> canonical organ table.
        val_fraction: share of cases in the validation split.
        seed: seed of the train/val split.
        labelmap_globs: file-name patterns of label map files (NIfTI/NRRD) to use.
        series_uids: CT series to keep where a patient study has several.
        salt: pseudonym salt; None reads or creates ``CASES_DIR/.pseudonym-salt``.
        organ_set: the organ set (organs.ORGAN_SETS) the clinic's cases are labelled
            for; ROIs of organs outside it are reported and not imported, and the
            manifest records the set.
    """

    clinic: str = "clinic"
    spacing: tuple[float, float, float] | None = None
    hu_clip: tuple[float, float] = preprocess.DEFAULT_HU_CLIP
    crop: bool = True
    aliases: AliasTable = dataclasses.field(default_factory=AliasTable)
    val_fraction: float = 0.2
    seed: int = 0
    labelmap_globs: tuple[str, ...] = DEFAULT_LABELMAP_GLOBS
    series_uids: tuple[str, ...] = ()
    salt: str | None = None
    organ_set: str = DEFAULT_ORGAN_SET


@dataclasses.dataclass
class Problem:
    """One line about the input: ``severity`` is "note", "warning" or "error".

    Notes say what the importer decided on the user's behalf (which CT series of
    several, contours matched by geometry); they do not make the import fail.
    """

    severity: str
    text: str

    def line(self) -> str:
        """The line as printed."""
        return f"{self.severity}: {self.text}"


@dataclasses.dataclass
class ImportReport:
    """Outcome of :func:`import_clinic`.

    Attributes:
        cases: case ids written in this run.
        failed: case ids (pseudonyms) of patient studies that were not written.
        problems: warnings and errors, one line each.
        manifest: path of the manifest written (None when no case exists).
        slices: number of CT slices read for the written cases.
    """

    cases: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)
    problems: list[Problem] = dataclasses.field(default_factory=list)
    manifest: Path | None = None
    slices: int = 0

    @property
    def ok(self) -> bool:
        """True when no error was reported."""
        return not any(p.severity == "error" for p in self.problems)

    def note(self, text: str) -> None:
        """Record a decision the importer made (which series, how contours matched)."""
        logger.info("note: %s", text)
        self.problems.append(Problem("note", text))

    def warn(self, text: str) -> None:
        """Record a warning."""
        logger.info("warning: %s", text)
        self.problems.append(Problem("warning", text))

    def error(self, text: str) -> None:
        """Record an error."""
        logger.info("error: %s", text)
        self.problems.append(Problem("error", text))


@dataclasses.dataclass
class _Patient:
    key: tuple[str, str]
    case_id: str
    pseudonym: str
    series: list[str]


def check_import_options(options: ImportOptions) -> None:
    """Refuse import options out of range (one line naming the value)."""
    if not 0.0 <= options.val_fraction < 1.0:
        raise FedsegError(f"val fraction must be in [0, 1), got {options.val_fraction}")
    low, high = options.hu_clip
    if not low < high or low < -32768 or high > 32767:
        raise FedsegError(f"HU clip window {low}..{high}: need low < high within int16")
    if options.spacing is not None and (
        len(options.spacing) != 3 or any(not s > 0 for s in options.spacing)
    ):
        raise FedsegError(f"spacing must be three positive numbers (z y x), got {options.spacing}")
    if not options.clinic.strip():
        raise FedsegError("clinic name must not be empty")
    organ_set(options.organ_set)  # an unknown name is refused before any work


def load_salt(out: Path) -> str:
    """The clinic folder's pseudonym salt, created on first use."""
    path = out / SALT_NAME
    if path.exists():
        try:
            salt = path.read_text().strip()
        except OSError as exc:
            raise FedsegError(f"{path}: cannot read pseudonym salt ({exc.strerror})") from None
        if salt:
            return salt
    salt = secrets.token_hex(16)
    atomic_write_text(path, salt + "\n", mode=PRIVATE_FILE_MODE)
    return salt


def pseudonym(salt: str, *parts: str) -> str:
    """Short salted hash of identifying strings (12 hex digits)."""
    digest = hashlib.sha256("\x00".join((salt, *parts)).encode("utf-8")).hexdigest()
    return digest[:12]


def _group_patients(scan: ScanResult, salt: str) -> dict[tuple[str, str], _Patient]:
    patients: dict[tuple[str, str], _Patient] = {}
    for uid, files in sorted(scan.series_files().items()):
        key = (files[0].patient_id, files[0].study_uid)
        if key not in patients:
            patients[key] = _Patient(
                key=key,
                case_id="case-" + pseudonym(salt, *key),
                pseudonym="pt-" + pseudonym(salt, key[0]),
                series=[],
            )
        patients[key].series.append(uid)
    return patients


def _slice_name(geometry: Geometry, centre: np.ndarray) -> str:
    """"slice 3 of 98 (z -120.44 mm)" for a point, or its z when off the volume."""
    k = round(float(geometry.lps_to_index(np.asarray(centre)[None, :])[0, 0]))
    z = f"z {float(centre[2]):.2f} mm"
    if 0 <= k < geometry.shape[0]:
        return f"slice {k + 1} of {geometry.shape[0]} ({z})"
    return f"contour at {z} (off the CT volume)"


def _series_folder(files: list[DicomFile]) -> Path:
    """The deepest folder holding all of a series' files."""
    return Path(os.path.commonpath([str(f.path.parent) for f in files]))


def _labelmap_candidates(scan: ScanResult, globs: tuple[str, ...]) -> list[Path]:
    return [p for p in scan.other
            if any(fnmatch.fnmatch(p.name.lower(), g.lower()) for g in globs)]


def _organ_masks(
    series: CtSeries,
    structure_sets: list[StructureSet],
    segs: list[DicomSeg],
    labelmaps: list[LabelMap],
    aliases: AliasTable,
    report: ImportReport,
    case_id: str,
    organs: tuple[str, ...] | None = None,
) -> tuple[dict[str, np.ndarray], list[str], dict[str, str]]:
    """Rasterise every label source; returns masks, unmapped names, ROI name -> organ."""
    masks: dict[str, np.ndarray] = {}
    unmapped: list[str] = []
    mapping: dict[str, str] = {}

    def add(name: str, mask: np.ndarray, where: Path) -> None:
        organ = aliases.canonical(name)
        if organ is None:
            if name not in unmapped:
                unmapped.append(name)
            report.warn(f"{where}: {case_id}: ROI {name!r} maps to no organ (add it to an "
                        "alias table with --aliases); not imported")
            return
        if organs is not None and organ not in organs:
            if name not in unmapped:
                unmapped.append(name)
            report.warn(f"{where}: {case_id}: ROI {name!r} ({organ}) is not in the organ "
                        "set (--organ-set); not imported")
            return
        mapping[name] = organ
        if not mask.any():
            report.warn(f"{where}: {case_id}: ROI {name!r} ({organ}) is empty; "
                        f"{organ} left unlabelled")
            return
        if organ in masks:
            report.warn(f"{where}: {case_id}: several ROIs map to {organ}; their union is used")
            masks[organ] = masks[organ] | mask
        else:
            masks[organ] = mask

    for ss in structure_sets:
        if not ss.matched_by_geometry:
            check_reference(ss, series)
        # Matched by geometry: each contour goes to the slice within half a spacing
        # (matching refused contours halfway between slices).
        tolerance = 0.5 if ss.matched_by_geometry else PLANE_TOLERANCE
        for roi in ss.rois:
            for centre, why in roi.degenerate:
                report.warn(f"{ss.path}: {case_id}: ROI {roi.name!r}: "
                            f"{_slice_name(series.geometry, centre)}: degenerate contour "
                            f"skipped ({why}); the ROI's other contours are kept")
            result = rasterise_roi(roi, series.geometry, tolerance)
            for line in result.warnings(roi.name):
                if line.endswith("empty mask"):
                    continue  # reported by add() together with the organ
                report.warn(f"{ss.path}: {case_id}: {line}")
            add(roi.name, result.mask, ss.path)
    for seg in segs:
        if seg.series_uids and series.series_uid not in seg.series_uids:
            raise FedsegError(f"{seg.path}: SEG references series {', '.join(seg.series_uids)}, "
                              f"not {series.series_uid}")
        for number, mask in sorted(dicom_seg_to_grid(seg, series.geometry).items()):
            add(seg.names[number], mask, seg.path)
    for lm in labelmaps:
        grid = labelmap_to_grid(lm, series.geometry)
        for value, name in sorted(lm.names.items()):
            add(name, grid == value, lm.path)
    return masks, unmapped, mapping


def _import_patient(
    patient: _Patient,
    stack: Stack,
    structure_sets: list[StructureSet],
    segs: list[DicomSeg],
    labelmap_paths: list[Path],
    out: Path,
    options: ImportOptions,
    report: ImportReport,
) -> str:
    """Import one patient study; raises FedsegError, writes nothing on failure."""
    series = read_series([f.path for f in stack.files])
    for line in series.warnings:
        report.warn(f"{patient.case_id}: {line}")
    labelmaps = []
    for path in labelmap_paths:
        lm = read_labelmap(path)
        if not bounds_overlap(lm, series.geometry):
            raise FedsegError(f"{path}: label map does not overlap the CT series it sits beside "
                              f"({series.files[0].parent})")
        labelmaps.append(lm)
    masks, unmapped, mapping = _organ_masks(series, structure_sets, segs, labelmaps,
                                            options.aliases, report, patient.case_id,
                                            organ_set(options.organ_set).organs)
    hu = series.hu
    geometry = series.geometry
    extra: dict[str, object] = {
        "native_spacing": list(geometry.spacing),
        "native_shape": list(geometry.shape),
        "roi_organs": mapping,
        # Counts, not file names: clinics name files after patients.
        "label_sources": {"rtstruct": len(structure_sets), "seg": len(segs),
                          "labelmap": len(labelmap_paths)},
        "crop": options.crop,
        # How the labels were tied to this CT: anonymised UIDs force geometry.
        "contour_matching": "geometry" if any(ss.matched_by_geometry
                                              for ss in structure_sets) else "uid",
    }
    if stack.part or len(series.files) != len(stack.files) or patient.series != [
            stack.series_uid]:
        extra["series_choice"] = stack.describe()
    image, masks, geometry = preprocess_case(hu, masks, geometry, options, report,
                                             patient.case_id, extra)
    meta = CaseMeta(
        case_id=patient.case_id,
        patient_pseudonym=patient.pseudonym,
        shape=geometry.shape,
        spacing=geometry.spacing,
        origin=geometry.origin,
        direction=geometry.flat_direction(),
        labelled_organs=tuple(sorted(masks)),
        source="dicom+labelmap" if labelmap_paths else "dicom",
        source_series_uid=series.series_uid,
        hu_clip=(float(options.hu_clip[0]), float(options.hu_clip[1])),
        unmapped_rois=tuple(unmapped),
        extra=extra,
    )
    write_case(Case(meta=meta, image=image, masks=masks), out, overwrite=True)
    report.slices += len(series.files)
    return patient.case_id


def preprocess_case(hu: np.ndarray, masks: dict[str, np.ndarray], geometry: Geometry,
                    options: ImportOptions, report: ImportReport, case_id: str,
                    extra: dict[str, object]) -> tuple[np.ndarray, dict[str, np.ndarray],
                                                       Geometry]:
    """Crop to the body, resample, drop organs left empty, clip HU: one imported case.

    Shared by the DICOM and the NIfTI/NRRD importers. The crop box holds the body (the
    BODY ROI, else a threshold body) and every contoured organ: contours lie in the
    patient by definition, and a threshold body can miss a slice or two (OpenKBP's
    lowest cord slices in some patients), which must not cut a contour.

    Args:
        hu: the CT in HU (z, y, x).
        masks: organ -> boolean mask on the CT's grid (changed in place: empty organs go).
        geometry: the CT's geometry.
        options: crop, spacing and HU clip.
        report: where warnings go.
        case_id: the case's id (for warnings).
        extra: the case sidecar's extra fields (``crop_body_from`` is added).

    Returns:
        (int16 image, masks, geometry) after preprocessing.
    """
    if options.crop:
        body = masks.get("body")
        extra["crop_body_from"] = "BODY ROI" if body is not None else "threshold"
        if body is None:
            body = preprocess.threshold_body_mask(hu)
        for mask in masks.values():
            body = body | mask
        box = preprocess.crop_box(body)
        hu = hu[box]
        masks = {organ: m[box] for organ, m in masks.items()}
        geometry = preprocess.crop_geometry(geometry, box)
    if options.spacing is not None:
        hu, masks, geometry = preprocess.resample(hu, masks, geometry, options.spacing)
    for organ in [o for o, m in masks.items() if not m.any()]:
        # Labelled-but-empty means "truly absent"; a contoured organ is not.
        report.warn(f"{case_id}: {organ} is empty after cropping/resampling to "
                    f"{geometry.spacing} mm; {organ} left unlabelled")
        del masks[organ]
    return preprocess.clip_hu(hu, *options.hu_clip), masks, geometry


def write_import_manifest(out: Path, options: ImportOptions, report: ImportReport) -> None:
    """Write the clinic manifest (train/val split) over every case folder in ``out``."""
    metas = []
    for child in sorted(out.iterdir()):
        if child.is_dir() and not child.name.startswith(".") and (child / CASE_META_NAME).exists():
            try:
                metas.append(read_case_meta(child))
            except FedsegError as exc:
                report.warn(f"{exc}; left out of the manifest")
    if not metas:
        return
    splits = assign_splits([m.case_id for m in metas], options.val_fraction, options.seed)
    manifest = Manifest(
        clinic=options.clinic,
        cases=[manifest_entry(m, splits[m.case_id]) for m in metas],
        extra={
            "val_fraction": options.val_fraction,
            "seed": options.seed,
            "spacing": list(options.spacing) if options.spacing else None,
            "hu_clip": list(options.hu_clip),
            "crop": options.crop,
            "organ_set": organ_set(options.organ_set).to_json(),
        },
    )
    report.manifest = write_manifest(manifest, out)


def import_clinic(src: Path, out: Path, options: ImportOptions) -> ImportReport:
    """Import every patient study under ``src`` into the clinic folder ``out``.

    Args:
        src: folder of DICOM files (and optional label maps), nested folders allowed.
        out: clinic folder (CASES_DIR); created if missing; cases of the same id are
            replaced, other cases already there stay and are listed in the manifest.
        options: import settings.

    Returns:
        The report: cases written, patients failed, and one line per problem.

    Raises:
        FedsegError: for bad options, an unreadable ``src`` or no CT series at all.
    """
    with warnings.catch_warnings():
        # pydicom warns (multi-line, on stderr) about values like 'NaN' in a DS element;
        # we check those values ourselves and report them as one line naming the file.
        warnings.filterwarnings("ignore", message="Invalid value for VR", category=UserWarning)
        return _import_clinic(src, out, options)


def _import_clinic(src: Path, out: Path, options: ImportOptions) -> ImportReport:
    check_import_options(options)
    scan = scan_folder(src, exclude=[out])
    report = ImportReport()
    for path, reason in scan.skipped:
        report.warn(f"{path}: skipped: {reason}")
    series_files = scan.series_files()
    if not series_files:
        raise FedsegError(f"{src}: no CT series found ({len(scan.dicom)} usable DICOM "
                          f"file(s){_skipped_summary(scan.skipped)})")
    out.mkdir(parents=True, exist_ok=True)
    # The clinic folder holds CT data and the pseudonym salt: its owner only.
    os.chmod(out, PRIVATE_DIR_MODE)
    salt_path = out / SALT_NAME
    if salt_path.exists():
        os.chmod(salt_path, PRIVATE_FILE_MODE)  # tighten a salt written by older versions
    salt = options.salt if options.salt is not None else load_salt(out)
    patients = _group_patients(scan, salt)

    # Structure sets -> series.
    structure_sets: dict[str, list[StructureSet]] = {}
    # Unreadable label files fail their patient study (by header), so no case is written
    # without labels it should have.
    broken: dict[tuple[str, str], Path] = {}
    for item in scan.of_modality("RTSTRUCT"):
        try:
            ss = read_rtstruct(item.path)
        except FedsegError as exc:
            report.error(str(exc))
            broken.setdefault((item.patient_id, item.study_uid), item.path)
            continue
        match = match_structure_set(ss, series_files,
                                    _geometry_candidates(item, series_files))
        if match.series_uid is None:
            report.error(match.note)
            continue
        if match.by_geometry:
            ss.matched_by_geometry = True
            report.note(match.note)
        structure_sets.setdefault(match.series_uid, []).append(ss)
    for item in scan.dicom:
        if item.modality not in ("CT", "RTSTRUCT", "SEG"):
            report.warn(f"{item.path}: skipped: modality {item.modality or '(none)'} is not "
                        "imported")
    segs: dict[str, list[DicomSeg]] = {}
    for item in scan.of_modality("SEG"):
        try:
            seg = read_dicom_seg(item.path)
        except FedsegError as exc:
            report.error(str(exc))
            broken.setdefault((item.patient_id, item.study_uid), item.path)
            continue
        uid = next((u for u in seg.series_uids if u in series_files), None)
        if uid is None:
            uid = next((u for u, files in series_files.items()
                        if seg.frame_of_reference_uid
                        and files[0].frame_of_reference_uid == seg.frame_of_reference_uid), None)
        if uid is None:
            refs = ", ".join(seg.series_uids) or "(no series reference)"
            report.error(f"{item.path}: SEG points at CT series {refs}, which is not in {src}")
            continue
        segs.setdefault(uid, []).append(seg)

    # Label maps -> the one series under their folder that they overlap.
    labelmaps: dict[str, list[Path]] = {}
    candidates = _labelmap_candidates(scan, options.labelmap_globs)
    folders = {uid: _series_folder(files) for uid, files in series_files.items()}
    for path in candidates:
        near = [uid for uid, folder in folders.items() if folder.is_relative_to(path.parent)]
        if len(near) > 1:
            try:
                lm = read_labelmap(path)
            except FedsegError as exc:
                report.error(str(exc))
                continue
            near = [uid for uid in near if _overlaps(lm, uid, series_files)]
        if len(near) != 1:
            what = "no CT series" if not near else f"{len(near)} CT series"
            report.error(f"{path}: label map matches {what} in or below its folder; put it "
                         "beside its CT slices")
            continue
        labelmaps.setdefault(near[0], []).append(path)
    for path in scan.other:
        if path not in candidates:
            report.warn(f"{path}: skipped: not DICOM and not a label map "
                        f"(patterns {', '.join(options.labelmap_globs)})")

    for patient in patients.values():
        refused = broken.get(patient.key) or next(
            # A refused label file whose study UID matches no CT (regenerated by an
            # anonymiser) fails every study of its PatientID: none may lose its labels.
            (path for (pid, study), path in broken.items()
             if pid == patient.key[0] and (pid, study) not in patients), None)
        if refused is not None:
            report.error(f"{patient.case_id}: not imported: its label file {refused} "
                         "was refused (error above)")
            report.failed.append(patient.case_id)
            continue
        stacks = [stack for uid in patient.series
                  for stack in split_stacks(uid, series_files[uid])]
        labelled = {uid for uid in patient.series
                    if uid in structure_sets or uid in segs or uid in labelmaps}
        try:
            stack, note = choose_stack(patient.case_id, stacks, labelled, options.series_uids)
        except FedsegError as exc:
            report.error(str(exc))
            report.failed.append(patient.case_id)
            continue
        if note is not None:
            report.note(note)
        uid = stack.series_uid
        for other in sorted(labelled - {uid}):
            report.warn(f"{patient.case_id}: label files of CT series {other} not imported "
                        f"(series {uid} was chosen)")
        try:
            case_id = _import_patient(
                patient, stack, structure_sets.get(uid, []), segs.get(uid, []),
                labelmaps.get(uid, []), out, options, report,
            )
        except FedsegError as exc:
            report.error(f"{patient.case_id}: {exc}")
            report.failed.append(patient.case_id)
            continue
        report.cases.append(case_id)
        logger.info("imported %s from series %s", case_id, uid)
    write_import_manifest(out, options, report)
    return report


def _skipped_summary(skipped: list[tuple[Path, str]]) -> str:
    """", N skipped: REASON (FILE, ...)" per reason, for a one-line error; "" if none."""
    if not skipped:
        return ""
    by_reason: dict[str, list[Path]] = {}
    for path, reason in skipped:
        by_reason.setdefault(reason, []).append(path)
    parts = []
    for reason, paths in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
        parts.append(f"{len(paths)} {reason}: {paths[0]}{more}")
    return f", {len(skipped)} skipped: " + "; ".join(parts)


def _geometry_candidates(item: DicomFile, series_files: dict[str, list[DicomFile]]
                         ) -> list[str]:
    """Series an RTSTRUCT may be matched to by geometry.

    The same PatientID's series (any study: anonymisers regenerate study UIDs too), else
    those in or below the RTSTRUCT's folder whose PatientID or the RTSTRUCT's is blank.
    Two different PatientIDs are never matched by geometry: contours put on another
    patient's CT of the same slice grid would be a silent, dangerous error.
    """
    same_patient = [uid for uid, files in series_files.items()
                    if item.patient_id and files[0].patient_id == item.patient_id]
    if same_patient:
        return same_patient
    return [uid for uid, files in series_files.items()
            if not (item.patient_id and files[0].patient_id)
            and _series_folder(files).is_relative_to(item.path.parent)]


def _overlaps(lm: LabelMap, uid: str, series_files: dict[str, list[DicomFile]]) -> bool:
    """Overlap test of a label map with a series (reads its largest stack)."""
    try:
        series = read_series([f.path for f in split_stacks(uid, series_files[uid])[0].files])
    except FedsegError:
        return False
    return bounds_overlap(lm, series.geometry)
