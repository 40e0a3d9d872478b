"""The on-disk case format shared by the DICOM importer and the phantom generator.

A clinic folder (``CASES_DIR``) holds one sub-folder per patient and a manifest::

    CASES_DIR/
      manifest.json            clinic name, format version, organs, cases and their split
      <case_id>/
        image.npy              int16 CT in Hounsfield units, axes (z, y, x), clipped
        masks.npz              one boolean (z, y, x) array per labelled organ (canonical names)
        case.json              sidecar: geometry, organs, provenance (see CaseMeta)

Geometry follows DICOM patient coordinates (LPS, mm). ``origin`` is the centre of voxel
(0, 0, 0); ``direction`` is a 3x3 matrix whose *columns* are the unit vectors (in LPS) of
the array axes x (column index), y (row index) and z (slice index) - the same convention
as ITK/SimpleITK; ``spacing`` is (z, y, x) in mm like the array axes.

``labelled_organs`` lists the organs this clinic contours for the case. An organ not in
it is *unknown*, not absent: training masks it out of the loss and metrics report NaN.
An organ in it whose mask is empty is truly absent.

Writes are atomic: a case is written into a temporary sibling folder and renamed into
place, the manifest through a temporary file and ``os.replace``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.io import PRIVATE_DIR, PRIVATE_FILE, atomic_write_text, read_json_object
from fedseg_clinic.organs import ALL_ORGANS, OrganSet

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
CASE_META_NAME = "case.json"
IMAGE_NAME = "image.npy"
MASKS_NAME = "masks.npz"


@dataclasses.dataclass
class CaseMeta:
    """The JSON sidecar of one case.

    Attributes:
        case_id: folder name; a pseudonym, never the patient's name or DICOM PatientID.
        patient_pseudonym: stable pseudonymous patient id (salted hash or generator id).
        shape: array shape (z, y, x).
        spacing: voxel size (z, y, x) in mm.
        origin: LPS position (x, y, z) in mm of the centre of voxel (0, 0, 0).
        direction: 3x3 row-major matrix, columns = LPS unit vectors of array axes x, y, z.
        labelled_organs: organs contoured for this case (canonical names).
        source: "dicom", "labelmap", "phantom", ...
        source_series_uid: SeriesInstanceUID of the CT series, or "" for phantoms.
        hu_clip: the (low, high) HU window the image was clipped to.
        unmapped_rois: ROI names found in the label source that no alias maps.
        extra: free-form provenance (generator parameters, preprocessing settings).
    """

    case_id: str
    patient_pseudonym: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    labelled_organs: tuple[str, ...] = ()
    source: str = ""
    source_series_uid: str = ""
    hu_clip: tuple[float, float] = (-1024.0, 3071.0)
    unmapped_rois: tuple[str, ...] = ()
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str) -> CaseMeta:
        """Build from parsed JSON; ``where`` names the file in error messages."""
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
            and f.name not in data
        ]
        if missing:
            raise FedsegError(f"{where}: missing key(s) {', '.join(missing)}")
        kwargs = {k: v for k, v in data.items() if k in names}
        for key in ("shape", "spacing", "origin", "direction", "labelled_organs", "hu_clip",
                    "unmapped_rois"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        meta = cls(**kwargs)
        if meta.format_version != FORMAT_VERSION:
            raise FedsegError(
                f"{where}: case format version {meta.format_version}, expected {FORMAT_VERSION}"
            )
        unknown = [o for o in meta.labelled_organs if o not in ALL_ORGANS]
        if unknown:
            raise FedsegError(f"{where}: unknown organ name(s) {', '.join(unknown)}")
        return meta


@dataclasses.dataclass
class Case:
    """One patient's preprocessed CT and organ masks."""

    meta: CaseMeta
    image: np.ndarray  # int16 HU, (z, y, x)
    masks: dict[str, np.ndarray]  # organ -> bool (z, y, x); only labelled organs

    def mask(self, organ: str) -> np.ndarray | None:
        """The organ's mask, or None when the organ is not labelled for this case."""
        return self.masks.get(organ)


def _check_case(case: Case) -> None:
    shape = tuple(case.image.shape)
    if case.image.ndim != 3:
        raise FedsegError(f"case {case.meta.case_id}: image must be 3-D, got shape {shape}")
    if tuple(case.meta.shape) != shape:
        raise FedsegError(
            f"case {case.meta.case_id}: sidecar shape {case.meta.shape} != image shape {shape}"
        )
    for organ, mask in case.masks.items():
        if organ not in ALL_ORGANS:
            raise FedsegError(f"case {case.meta.case_id}: unknown organ {organ!r}")
        if tuple(mask.shape) != shape:
            raise FedsegError(
                f"case {case.meta.case_id}: mask {organ} shape {mask.shape} != image {shape}"
            )
    if set(case.masks) != set(case.meta.labelled_organs):
        raise FedsegError(
            f"case {case.meta.case_id}: masks {sorted(case.masks)} do not match "
            f"labelled_organs {sorted(case.meta.labelled_organs)}"
        )


#: Modes of what holds patient data (CT, masks, sidecars, manifest, salt): owner only.
PRIVATE_FILE_MODE = PRIVATE_FILE
PRIVATE_DIR_MODE = PRIVATE_DIR


def _private_file(path: Path) -> BinaryIO:
    """Open a new file for writing with mode 0600 from the start (no readable window)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
    return os.fdopen(fd, "wb")


def write_case(case: Case, cases_dir: Path, overwrite: bool = False) -> Path:
    """Write one case atomically to ``cases_dir/<case_id>/`` and return that folder."""
    _check_case(case)
    cases_dir.mkdir(parents=True, exist_ok=True)
    final = cases_dir / case.meta.case_id
    if final.exists() and not overwrite:
        raise FedsegError(f"{final}: case already exists (use overwrite)")
    # mkdtemp makes the folder 0700: patient data stays readable by its owner only.
    tmp = Path(tempfile.mkdtemp(prefix=f".{case.meta.case_id}.", dir=cases_dir))
    try:
        with _private_file(tmp / IMAGE_NAME) as handle:
            np.save(handle, np.ascontiguousarray(case.image, dtype=np.int16))
        with _private_file(tmp / MASKS_NAME) as handle:
            np.savez_compressed(
                handle, **{k: np.asarray(v, dtype=bool) for k, v in case.masks.items()}
            )
        with _private_file(tmp / CASE_META_NAME) as handle:
            handle.write(json.dumps(case.meta.to_json(), indent=2).encode("utf-8"))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_case_meta(case_dir: Path) -> CaseMeta:
    """Read only the sidecar of a case folder."""
    path = case_dir / CASE_META_NAME
    data = read_json_object(path, "case sidecar",
                            missing=f"{case_dir}: not a case folder (no {CASE_META_NAME})")
    return CaseMeta.from_json(data, str(path))


def read_case(case_dir: Path) -> Case:
    """Read a case folder written by :func:`write_case`."""
    meta = read_case_meta(case_dir)
    try:
        image = np.load(case_dir / IMAGE_NAME)
        with np.load(case_dir / MASKS_NAME) as npz:
            masks = {k: npz[k].astype(bool) for k in npz.files}
    except (OSError, ValueError) as exc:
        raise FedsegError(f"{case_dir}: unreadable case data ({exc})") from None
    case = Case(meta=meta, image=image, masks=masks)
    _check_case(case)
    return case


@dataclasses.dataclass
class ManifestEntry:
    """One case in a clinic's manifest."""

    case_id: str
    split: str  # "train" or "val"
    labelled_organs: tuple[str, ...]
    shape: tuple[int, int, int]


@dataclasses.dataclass
class Manifest:
    """A clinic folder's index of cases (``manifest.json``)."""

    clinic: str
    cases: list[ManifestEntry]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def split(self, name: str) -> list[ManifestEntry]:
        """Entries of one split ("train" or "val")."""
        return [c for c in self.cases if c.split == name]


def write_manifest(manifest: Manifest, cases_dir: Path) -> Path:
    """Write ``cases_dir/manifest.json`` atomically."""
    path = cases_dir / MANIFEST_NAME
    data = json.loads(json.dumps(dataclasses.asdict(manifest)))
    atomic_write_text(path, json.dumps(data, indent=2), mode=PRIVATE_FILE_MODE)
    return path


def read_manifest(cases_dir: Path) -> Manifest:
    """Read a clinic folder's manifest; errors name the file."""
    path = cases_dir / MANIFEST_NAME
    if not cases_dir.is_dir():
        raise FedsegError(f"{cases_dir}: data folder does not exist")
    try:
        data = json.loads(path.read_text())
        entries = [
            ManifestEntry(
                case_id=str(c["case_id"]),
                split=str(c["split"]),
                labelled_organs=tuple(c["labelled_organs"]),
                shape=tuple(c["shape"]),  # type: ignore[arg-type]
            )
            for c in data["cases"]
        ]
        manifest = Manifest(
            clinic=str(data["clinic"]),
            cases=entries,
            extra=dict(data.get("extra", {})),
            format_version=int(data.get("format_version", 0)),
        )
    except FileNotFoundError:
        raise FedsegError(f"{cases_dir}: no {MANIFEST_NAME} (not a clinic folder)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FedsegError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from None
    if manifest.format_version != FORMAT_VERSION:
        raise FedsegError(
            f"{path}: format version {manifest.format_version}, expected {FORMAT_VERSION}"
        )
    for entry in manifest.cases:
        if entry.split not in ("train", "val"):
            raise FedsegError(f"{path}: case {entry.case_id} has split {entry.split!r}")
    return manifest


def contoured_organs(cases_dir: Path, split: str = "train") -> tuple[str, ...]:
    """The organs contoured in any case of one split of a clinic folder (sorted).

    A clinic's contouring protocol as its data shows it: an organ it never draws is in
    no case's ``labelled_organs``.
    """
    return tuple(sorted({o for entry in read_manifest(cases_dir).split(split)
                         for o in entry.labelled_organs}))


def manifest_entry(meta: CaseMeta, split: str) -> ManifestEntry:
    """The manifest entry describing a case."""
    return ManifestEntry(
        case_id=meta.case_id,
        split=split,
        labelled_organs=tuple(meta.labelled_organs),
        shape=tuple(meta.shape),  # type: ignore[arg-type]
    )


def assign_splits(case_ids: Sequence[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Deterministic train/val split of case ids (at least one of each when >= 2 cases)."""
    if not 0.0 <= val_fraction < 1.0:
        raise FedsegError(f"val_fraction must be in [0, 1), got {val_fraction}")
    ids = sorted(case_ids)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    n_val = round(val_fraction * len(ids))
    if len(ids) >= 2 and val_fraction > 0:
        n_val = min(max(n_val, 1), len(ids) - 1)
    val = {ids[i] for i in order[:n_val]}
    return {cid: ("val" if cid in val else "train") for cid in ids}


def check_organ_set(cases_dir: Path, organs: OrganSet) -> None:
    """Refuse a clinic folder whose data belong to another organ set than ``organs``.

    The manifest's ``extra.organ_set`` (written by the importer and the phantom
    generator) must be ``organs``; folders written before organ sets existed have none,
    and then every case's labelled organs must lie in the set.

    Raises:
        FedsegError: one line naming the folder, both sets, and the foreign organs.
    """
    manifest = read_manifest(cases_dir)
    record = manifest.extra.get("organ_set")
    if record is not None:
        organs.check_record(record, f"clinic data {cases_dir}")
        return
    foreign = sorted({o for entry in manifest.cases for o in entry.labelled_organs
                      if o not in organs.organs})
    if foreign:
        raise FedsegError(
            f"clinic data {cases_dir}: labels organ(s) {', '.join(foreign)}, which are not in "
            f"organ set {organs.key} ({', '.join(organs.organs)}); use data and models of "
            "one organ set"
        )
