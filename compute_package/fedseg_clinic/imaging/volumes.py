"""Import CT volumes stored as NIfTI or NRRD (with a label map or one mask per structure).

Most public CT data sets (OpenKBP, TotalSegmentator, the Medical Segmentation Decathlon)
ship a patient as one CT volume file plus labels, not as DICOM. A *volume case folder*
is a folder holding a CT file and its labels::

    <patient>/ct.nii.gz                      CT in HU (also image.*, *_ct.*; .nii, .nrrd)
    <patient>/segmentations/<ROI>.nii.gz     one mask per structure (TotalSegmentator,
                                             OpenKBP; also masks/, structures/, labels/)
    <patient>/<anything>seg*.nii.gz          or: one label map, non-zero values named as
                                             in labelmap.py (Slicer NRRD segment names)

ROI names (file stems, or label names) go through the same alias table as RTSTRUCT ROI
names (OpenKBP's "LeftParotid" -> parotid_left), and organs outside the import's organ set
are reported and left out.

Geometry care: the CT's voxel -> patient matrix (NIfTI's RAS affine turned into LPS,
NRRD's space directions) is checked to be orthogonal and non-degenerate, then the array
is permuted and flipped - never resampled - so that its axes (z, y, x) run as close as
possible to LPS (+S, +P, +L), the orientation of an axial DICOM series; what remains of
the rotation stays in ``direction``. Masks are put onto that grid by nearest neighbour
through their own matrices (labelmap.labelmap_to_grid), so masks on the CT's own grid
keep every voxel and a mask's volume in cc is its voxel count times the voxel volume.

Preprocessing (crop to the body, optional resampling, HU clip), pseudonymous case ids
(a salted hash of the case folder's path below the import folder), atomic case writes
and the manifest are those of the DICOM importer; every problem is one line in the
report naming the file, and a case with an error is not written.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import json
import logging
import os
from pathlib import Path

import numpy as np

from fedseg_clinic.cases import Case, CaseMeta, write_case
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.imaging.importer import (
    ImportOptions,
    ImportReport,
    load_salt,
    preprocess_case,
    pseudonym,
    write_import_manifest,
)
from fedseg_clinic.imaging.labelmap import (
    _NRRD_SPACES,
    LabelMap,
    _stem,
    bounds_overlap,
    labelmap_to_grid,
    read_labelmap,
)
from fedseg_clinic.imaging.series import Geometry
from fedseg_clinic.organs import organ_set

logger = logging.getLogger(__name__)

VOLUME_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr")
# File names (lower case, before the suffix) that are the CT of a volume case folder.
CT_NAMES: tuple[str, ...] = ("ct", "image", "img", "*_ct", "ct_*", "*_0000")
MASK_FOLDERS: tuple[str, ...] = ("segmentations", "masks", "structures", "labels")
# A mask's orientation axes may deviate this much (cosine) from orthogonal.
ORTHOGONALITY_TOL = 1e-3


@dataclasses.dataclass
class Volume:
    """A CT volume on a (z, y, x) grid close to LPS.

    Attributes:
        path: the file.
        hu: float32 (z, y, x) Hounsfield units.
        geometry: the grid (direction columns close to identity).
        file_axes: for each array axis (z, y, x), the file's index axis it came from and
            whether it was reversed, e.g. ``["k-", "j+", "i+"]`` (provenance).
    """

    path: Path
    hu: np.ndarray
    geometry: Geometry
    file_axes: list[str]


@dataclasses.dataclass
class VolumeCase:
    """One volume case folder found under the import folder.

    Attributes:
        folder: the case folder.
        ct: its CT file.
        masks: one file per structure (from a mask folder).
        labelmaps: label map files (several structures per file).
        problem: why the folder cannot be imported ("" when it can).
    """

    folder: Path
    ct: Path
    masks: list[Path]
    labelmaps: list[Path]
    problem: str = ""


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), None)


def is_volume_file(path: Path) -> bool:
    """True for a NIfTI (.nii, .nii.gz) or NRRD (.nrrd, .nhdr) file name."""
    return _suffix(path) is not None


def _is_ct_name(path: Path) -> bool:
    suffix = _suffix(path)
    if suffix is None:
        return False
    base = path.name.lower()[: -len(suffix)]
    return any(fnmatch.fnmatch(base, pattern) for pattern in CT_NAMES)


def canonical_grid(data: np.ndarray, affine: np.ndarray, where: Path
                   ) -> tuple[np.ndarray, Geometry, list[str]]:
    """Permute and flip an (i, j, k) array so its (z, y, x) axes run closest to LPS.

    Args:
        data: 3-D array in file index order (i fastest in the file).
        affine: 4x4 (i, j, k) index -> LPS mm.
        where: the file, for messages.

    Returns:
        (array (z, y, x), its geometry, file axis of each array axis).

    Raises:
        FedsegError: for a degenerate or non-orthogonal (sheared) voxel matrix.
    """
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing_ijk = np.linalg.norm(linear, axis=0)
    if not np.all(np.isfinite(linear)) or np.any(spacing_ijk < 1e-6):
        raise FedsegError(f"{where}: voxel size {tuple(np.round(spacing_ijk, 6))} mm: "
                          "a zero or invalid spacing")
    units = linear / spacing_ijk
    gram = units.T @ units
    if np.max(np.abs(gram - np.eye(3))) > ORTHOGONALITY_TOL:
        raise FedsegError(f"{where}: voxel axes are not orthogonal (sheared grid); "
                          "resample it to an orthogonal grid first")
    # file axis for each LPS axis (x, y, z): the assignment with the largest alignment.
    perm = max(itertools.permutations(range(3)),
               key=lambda p: sum(abs(units[a, p[a]]) for a in range(3)))
    signs = [1.0 if units[a, perm[a]] >= 0 else -1.0 for a in range(3)]
    array = np.transpose(data, (perm[2], perm[1], perm[0]))  # (z, y, x)
    for axis, lps in ((0, 2), (1, 1), (2, 0)):
        if signs[lps] < 0:
            array = np.flip(array, axis=axis)
    start = np.zeros(3)
    for lps in range(3):
        if signs[lps] < 0:
            start[perm[lps]] = data.shape[perm[lps]] - 1
    origin = affine[:3, :3] @ start + affine[:3, 3]
    direction = np.stack([signs[a] * units[:, perm[a]] for a in range(3)], axis=1)
    geometry = Geometry(
        shape=tuple(int(n) for n in array.shape),  # type: ignore[arg-type]
        spacing=(float(spacing_ijk[perm[2]]), float(spacing_ijk[perm[1]]),
                 float(spacing_ijk[perm[0]])),
        origin=tuple(float(v) for v in origin),  # type: ignore[arg-type]
        direction=tuple(tuple(float(v) for v in row) for row in direction),
    )
    axes = [f"{'ijk'[perm[lps]]}{'+' if signs[lps] > 0 else '-'}" for lps in (2, 1, 0)]
    return np.ascontiguousarray(array), geometry, axes


def _read_nifti_ct(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxels (scaling applied) and the (i, j, k) -> LPS affine of a NIfTI file."""
    import nibabel

    try:
        image = nibabel.load(str(path))
        data = np.asanyarray(image.dataobj)  # applies scl_slope / scl_inter
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on bad files
        raise FedsegError(f"{path}: cannot read NIfTI ({exc})") from None
    # NIfTI world space is RAS: flip x and y to reach DICOM's LPS.
    return data, np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(image.affine, dtype=np.float64)


def _read_nrrd_ct(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Voxels and the (i, j, k) -> LPS affine of an NRRD file."""
    import nrrd

    try:
        data, header = nrrd.read(str(path))
    except Exception as exc:  # noqa: BLE001 - pynrrd raises its own and numpy errors
        raise FedsegError(f"{path}: cannot read NRRD ({exc})") from None
    space = str(header.get("space", "")).lower()
    if space not in _NRRD_SPACES:
        raise FedsegError(f"{path}: NRRD space {space or '(none)'!r} is not a patient space")
    directions = np.asarray(header.get("space directions"), dtype=np.float64)
    if directions.shape != (3, 3):
        raise FedsegError(f"{path}: CT must be 3-D with 3 space directions, got shape "
                          f"{data.shape}")
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
    flip = np.asarray(_NRRD_SPACES[space])
    affine = np.eye(4)
    affine[:3, :3] = (directions * flip[None, :]).T  # one direction per axis: columns
    affine[:3, 3] = origin * flip
    return data, affine


def read_volume(path: Path) -> Volume:
    """Read a NIfTI or NRRD CT volume into HU on a grid close to LPS.

    Raises:
        FedsegError: naming the file when it is unreadable, not 3-D, not numeric,
            holds NaN, or has a degenerate or sheared voxel matrix.
    """
    suffix = _suffix(path)
    if suffix is None:
        raise FedsegError(f"{path}: unknown volume format (use .nii, .nii.gz, .nrrd or .nhdr)")
    if not path.is_file():
        raise FedsegError(f"{path}: CT file does not exist")
    data, affine = _read_nrrd_ct(path) if suffix in (".nrrd", ".nhdr") else _read_nifti_ct(path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise FedsegError(f"{path}: CT must be 3-D, got shape {data.shape}")
    if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
        raise FedsegError(f"{path}: CT voxels must be numbers, got dtype {data.dtype}")
    hu = data.astype(np.float32)
    if not np.all(np.isfinite(hu)):
        raise FedsegError(f"{path}: CT holds NaN or infinite values")
    array, geometry, axes = canonical_grid(hu, affine, path)
    return Volume(path=path, hu=array, geometry=geometry, file_axes=axes)


def find_volume_cases(src: Path) -> list[VolumeCase]:
    """Every volume case folder under ``src`` (or the one CT file ``src`` names).

    A folder is a case folder when it holds exactly one CT-named volume file (ct.*,
    image.*, *_ct.*). Its labels: every volume file in its mask folder(s), plus label
    map files (``*seg*``/``*label*``) beside the CT.

    A folder with several CT-named files is returned with a ``problem`` (its import
    fails, the others go on).

    Raises:
        FedsegError: when ``src`` does not exist.
    """
    if src.is_file():
        if not is_volume_file(src):
            raise FedsegError(f"{src}: not a NIfTI/NRRD CT file")
        cts = {src.parent: [src]}
    elif src.is_dir():
        cts = {}
        # Symlinked folders are followed (data sets are often linked in); a link cycle
        # is cut by remembering the real folders seen.
        seen: set[Path] = set()
        for root, dirs, names in os.walk(src, followlinks=True):
            real = Path(root).resolve()
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                             and d.lower() not in MASK_FOLDERS)
            for name in sorted(names):
                path = Path(root) / name
                if not name.startswith(".") and _is_ct_name(path) and path.is_file():
                    cts.setdefault(Path(root), []).append(path)
    else:
        raise FedsegError(f"{src}: does not exist")
    cases = []
    for folder, files in sorted(cts.items()):
        problem = ""
        if len(files) > 1:
            listing = ", ".join(f.name for f in files)
            problem = (f"{folder}: {len(files)} CT files ({listing}); keep one CT per case "
                       "folder")
        ct = files[0]
        masks = sorted(p for name in MASK_FOLDERS for p in (folder / name).glob("*")
                       if (folder / name).is_dir() and p.is_file() and is_volume_file(p)
                       and not p.name.startswith("."))
        labelmaps = sorted(
            p for p in folder.iterdir()
            if p.is_file() and p != ct and is_volume_file(p) and not p.name.startswith(".")
            and any(k in p.name.lower() for k in ("seg", "label", "mask"))
        )
        cases.append(VolumeCase(folder=folder, ct=ct, masks=masks, labelmaps=labelmaps,
                                problem=problem))
    return cases


def _label_table(path: Path) -> dict[int, str] | None:
    """Names of a label map's values from ``<stem>.json`` beside it, or None.

    The table is ``{"labels": {"1": "brainstem", ...}}``, what ``fedseg predict --format
    nifti`` writes.
    """
    table_path = path.with_name(_stem_of(path) + ".json")
    if not table_path.is_file():
        return None
    try:
        labels = json.loads(table_path.read_text())["labels"]
        return {int(value): str(name) for value, name in labels.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FedsegError(f"{table_path}: malformed label table ({type(exc).__name__}: "
                          f"{exc}); expected {{\"labels\": {{\"1\": \"name\", ...}}}}") from None


def _stem_of(path: Path) -> str:
    suffix = _suffix(path) or path.suffix
    return path.name[: -len(suffix)] if suffix else path.name


def _on_grid(lm: LabelMap, volume: Volume, resampled: list[str]) -> np.ndarray:
    """A label file's values on the CT's grid.

    A file on the CT's own grid (the usual case) is permuted and flipped like the CT -
    exact and cheap; any other grid is resampled by nearest neighbour (and listed in
    ``resampled``).
    """
    array, geometry, _ = canonical_grid(lm.labels, lm.affine, lm.path)
    if geometry.shape == volume.geometry.shape and np.allclose(
            geometry.matrix(), volume.geometry.matrix(), atol=1e-3):
        return array
    resampled.append(lm.path.name)
    return labelmap_to_grid(lm, volume.geometry)


def _case_key(folder: Path, src: Path) -> str:
    """What the pseudonym hashes: the case folder's path below the import folder."""
    folder, src = folder.resolve(), src.resolve()
    return str(folder.relative_to(src)) if folder.is_relative_to(src) else folder.name


def _import_volume_case(found: VolumeCase, key: str, out: Path, options: ImportOptions,
                        report: ImportReport, salt: str) -> str:
    """Import one volume case folder; raises FedsegError, writes nothing on failure."""
    if found.problem:
        raise FedsegError(found.problem)
    case_id = "case-" + pseudonym(salt, "volume", key)
    organs = organ_set(options.organ_set).organs
    volume = read_volume(found.ct)
    if not found.masks and not found.labelmaps:
        report.warn(f"{found.folder}: {case_id}: no masks or label map found (looked in "
                    f"{', '.join(MASK_FOLDERS)} and for *seg*/*label* files); imported "
                    "without labels")
    masks: dict[str, np.ndarray] = {}
    unmapped: list[str] = []
    mapping: dict[str, str] = {}
    resampled: list[str] = []

    def add(name: str, mask: np.ndarray, where: Path) -> None:
        organ = options.aliases.canonical(name)
        if organ is None or organ not in organs:
            if name not in unmapped:
                unmapped.append(name)
            why = ("maps to no organ (add it to an alias table with --aliases)" if organ is None
                   else f"({organ}) is not in organ set {options.organ_set} (--organ-set)")
            report.warn(f"{where}: {case_id}: structure {name!r} {why}; not imported")
            return
        mapping[name] = organ
        if not mask.any():
            report.warn(f"{where}: {case_id}: structure {name!r} ({organ}) is empty; "
                        f"{organ} left unlabelled")
            return
        if organ in masks:
            report.warn(f"{where}: {case_id}: several structures map to {organ}; their union "
                        "is used")
            masks[organ] = masks[organ] | mask
        else:
            masks[organ] = mask

    for path in found.masks:
        lm = read_labelmap(path)
        if not bounds_overlap(lm, volume.geometry):
            raise FedsegError(f"{path}: mask does not overlap its CT {found.ct.name}")
        add(_stem(path), _on_grid(lm, volume, resampled) != 0, path)
    for path in found.labelmaps:
        lm = read_labelmap(path)
        if not bounds_overlap(lm, volume.geometry):
            raise FedsegError(f"{path}: label map does not overlap its CT {found.ct.name}")
        lm.names = _label_table(path) or lm.names
        grid = _on_grid(lm, volume, resampled)
        for value, name in sorted(lm.names.items()):
            add(name, grid == value, path)
    if resampled:
        report.warn(f"{found.folder}: {case_id}: {len(resampled)} label file(s) on another grid "
                    "than the CT were resampled onto it (nearest neighbour)")

    hu, geometry = volume.hu, volume.geometry
    extra: dict[str, object] = {
        "native_spacing": list(geometry.spacing),
        "native_shape": list(geometry.shape),
        "file_axes": volume.file_axes,
        "roi_organs": mapping,
        "label_sources": {"masks": len(found.masks), "labelmap": len(found.labelmaps)},
        "crop": options.crop,
    }
    image, masks, geometry = preprocess_case(hu, masks, geometry, options, report, case_id,
                                             extra)
    meta = CaseMeta(
        case_id=case_id,
        patient_pseudonym="pt-" + pseudonym(salt, "volume", key),
        shape=geometry.shape,
        spacing=geometry.spacing,
        origin=geometry.origin,
        direction=geometry.flat_direction(),
        labelled_organs=tuple(sorted(masks)),
        source="nrrd" if _suffix(found.ct) in (".nrrd", ".nhdr") else "nifti",
        source_series_uid="",
        hu_clip=(float(options.hu_clip[0]), float(options.hu_clip[1])),
        unmapped_rois=tuple(unmapped),
        extra=extra,
    )
    write_case(Case(meta=meta, image=image, masks=masks), out, overwrite=True)
    report.slices += int(volume.hu.shape[0])
    return case_id


def import_volume_clinic(src: Path, out: Path, options: ImportOptions) -> ImportReport:
    """Import every volume case folder under ``src`` (or one CT file) into ``out``.

    Args:
        src: a folder of case folders (nested allowed), a case folder, or a CT file.
        out: the clinic folder; cases of the same id are replaced, others stay.
        options: the DICOM importer's settings (series_uids and labelmap_globs unused).

    Returns:
        The report: cases written, cases failed (with one error line each), warnings.

    Raises:
        FedsegError: for bad options or when ``src`` holds no CT volume at all.
    """
    from fedseg_clinic.imaging.importer import check_import_options

    check_import_options(options)
    found = find_volume_cases(src)
    if not found:
        raise FedsegError(f"{src}: no NIfTI/NRRD CT volume found (CT files are named "
                          f"{', '.join(n + '.nii.gz' for n in CT_NAMES[:3])}, ...)")
    out.mkdir(parents=True, exist_ok=True)
    salt = options.salt if options.salt is not None else load_salt(out)
    report = ImportReport()
    # Ids hash the case folder's path below the import folder; a case folder (or CT file)
    # imported on its own counts from its parent, so it keeps the id it gets in a batch.
    single = src.is_file() or any(c.folder.resolve() == src.resolve() for c in found)
    base = (src.resolve().parent.parent if src.is_file() else src.resolve().parent) \
        if single else src
    for index, case in enumerate(found, start=1):
        key = _case_key(case.folder, base)
        try:
            case_id = _import_volume_case(case, key, out, options, report, salt)
        except FedsegError as exc:
            failed = "case-" + pseudonym(salt, "volume", key)
            report.error(f"{failed}: not imported: {exc}")
            report.failed.append(failed)
            continue
        report.cases.append(case_id)
        logger.info("imported %s (%d/%d)", case_id, index, len(found))
    write_import_manifest(out, options, report)
    return report
