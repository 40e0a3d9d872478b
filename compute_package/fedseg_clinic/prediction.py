"""Segment new patients with a trained model and write contours a planning system loads.

``predict_path`` takes a model (model/bundle.py: an exported model folder or a round's
weights) and a CT - one DICOM series folder, one NIfTI/NRRD file, or a folder of many
patients (every CT series, or every volume case folder, below it) - and writes per patient:

- ``rtstruct`` (default): ``RS.fedseg.dcm``, a DICOM RTSTRUCT on the source series
  (imaging/rtstruct_writer.py); DICOM input only;
- ``seg``: ``SEG.fedseg.dcm``, a DICOM Segmentation (highdicom); DICOM input only;
- ``nifti``: ``labels.nii.gz``, a label map on the CT's grid (value k = the organ set's
  k-th organ), and ``labels.json`` naming the values, which ``fedseg data import`` reads.

Inference sees the CT as training did: resampled to the model's spacing when it has one,
HU window from the model, sliding window of its patch size; the label map is put back
onto the CT's own grid by nearest neighbour, so contours sit on the CT's slices. An
organ set's container (thorax's body) is every non-background voxel; other organs are
their class. A model trained on part of its organ set (card or record ``organs_trained``:
a local-only model of a clinic that never contours some organs) labels only those: the
argmax runs over background and its trained organs, and the others are not written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.imaging import preprocess
from fedseg_clinic.imaging.labelmap import LabelMap, labelmap_to_grid
from fedseg_clinic.imaging.matching import split_stacks
from fedseg_clinic.imaging.series import CtSeries, Geometry, read_series, scan_folder
from fedseg_clinic.imaging.volumes import find_volume_cases, is_volume_file, read_volume
from fedseg_clinic.model.bundle import LoadedModel, load_model
from fedseg_clinic.model.inference import allowed_classes, predict_labels
from fedseg_clinic.organs import OrganSet
from fedseg_clinic.patches import normalise_hu

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("rtstruct", "seg", "nifti")
RTSTRUCT_NAME = "RS.fedseg.dcm"
SEG_NAME = "SEG.fedseg.dcm"
LABELS_NAME = "labels.nii.gz"
LABELS_TABLE_NAME = "labels.json"


@dataclasses.dataclass
class CtInput:
    """One patient's CT to segment.

    Attributes:
        name: where its outputs go below OUT ("" for a single patient).
        source: the series folder or the volume file.
        series: the DICOM series (None for NIfTI/NRRD input).
        hu: float32 (z, y, x) HU.
        geometry: the CT's grid.
    """

    name: str
    source: Path
    series: CtSeries | None
    hu: np.ndarray
    geometry: Geometry


@dataclasses.dataclass
class Prediction:
    """What was written for one patient."""

    name: str
    source: Path
    outputs: list[Path]
    organs_found: list[str]
    seconds: float


def masks_from_labels(labels: np.ndarray, organs: OrganSet) -> dict[str, np.ndarray]:
    """Organ masks of a label map (the container is every non-background voxel)."""
    masks = {}
    for organ in organs.organs:
        mask = labels != 0 if organ == organs.container else labels == organs.class_index(organ)
        masks[organ] = mask
    return masks


def predict_volume(loaded: LoadedModel, hu: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Label map (uint8 (z, y, x)) of a CT on its own grid."""
    work_hu, work_geometry = hu, geometry
    if loaded.spacing is not None and not np.allclose(loaded.spacing, geometry.spacing,
                                                      rtol=1e-3):
        work_hu, _, work_geometry = preprocess.resample(hu, {}, geometry, loaded.spacing)
    image = normalise_hu(work_hu, loaded.hu_window)
    labels = predict_labels(loaded.model, image, loaded.patch_size, overlap=loaded.overlap,
                            allowed=allowed_classes(loaded.organs, loaded.organs_trained))
    if work_geometry is not geometry:
        # Back onto the CT's slices by nearest neighbour (labels never blend).
        grid = LabelMap(path=Path("prediction"), labels=labels.transpose(2, 1, 0),
                        affine=work_geometry.matrix(), names={})
        labels = labelmap_to_grid(grid, geometry).astype(np.uint8)
    return labels


def find_ct_inputs(ct_path: Path, notes: list[str] | None = None,
                   ) -> list[tuple[str, Callable[[], CtInput]]]:
    """The patients under ``ct_path``, each as (output name, loader).

    A series that is no axial CT volume (an unflagged scout in its own series, a
    coronal or sagittal reconstruction) is left out when the path also holds an axial
    series: the models are trained on axial volumes, and a scout is no patient.

    Args:
        ct_path: a NIfTI/NRRD file or a folder of DICOM series or volume cases.
        notes: if given, gets one line per series left out (which and why).

    Raises:
        FedsegError: when the path does not exist or holds no CT.
    """
    ct_path = Path(ct_path)
    if not ct_path.exists():
        raise FedsegError(f"{ct_path}: CT path does not exist")
    if ct_path.is_file():
        if not is_volume_file(ct_path):
            raise FedsegError(f"{ct_path}: not a NIfTI/NRRD CT file or a DICOM series folder")
        return [("", lambda: _volume_input("", ct_path))]
    volume_cases = find_volume_cases(ct_path)
    if volume_cases:
        single = len(volume_cases) == 1 and volume_cases[0].folder.resolve() == ct_path.resolve()
        return [(("" if single else str(c.folder.relative_to(ct_path))),
                 lambda c=c, s=single: _volume_input(
                     "" if s else str(c.folder.relative_to(ct_path)), c.ct, c.problem))
                for c in volume_cases]
    scan = scan_folder(ct_path)
    series = scan.series_files()
    if not series:
        raise FedsegError(f"{ct_path}: no CT series and no NIfTI/NRRD CT found "
                          f"({len(scan.dicom)} DICOM files, {len(scan.skipped)} unreadable)")
    groups = sorted(series.values(), key=lambda fs: str(fs[0].path))
    # The series' largest stack: a scout saved inside the series is left out.
    stacks = [split_stacks(fs[0].series_uid, fs)[0] for fs in groups]
    # (Files flagged LOCALIZER never get here: the folder scan skips them.)
    volume = [s.orientation == "axial" for s in stacks]
    if any(volume) and not all(volume):
        for stack, keep in zip(stacks, volume, strict=True):
            if not keep:
                if notes is not None:
                    notes.append(f"left out series {stack.describe()}: a {stack.orientation} "
                                 "image, not an axial CT volume")
        groups = [g for g, keep in zip(groups, volume, strict=True) if keep]
        stacks = [s for s, keep in zip(stacks, volume, strict=True) if keep]
    folders = [Path(os.path.commonpath([str(f.path.parent) for f in fs])) for fs in groups]
    names = [str(d.relative_to(ct_path)) if d != ct_path else "" for d in folders]
    if len(groups) > 1 and len(set(names)) != len(names):
        # Several series share a folder: name each by its SeriesInstanceUID.
        names = [str(Path(n) / fs[0].series_uid) for n, fs in zip(names, groups, strict=True)]
    elif len(groups) > 1:
        names = [n or fs[0].series_uid for n, fs in zip(names, groups, strict=True)]
    else:
        names = [""]
    inputs: list[tuple[str, Callable[[], CtInput]]] = []
    for name, folder, stack in zip(names, folders, stacks, strict=True):
        paths = [f.path for f in stack.files]
        inputs.append((name, lambda n=name, d=folder, p=paths: _series_input(n, d, p)))
    return inputs



def _volume_input(name: str, path: Path, problem: str = "") -> CtInput:
    if problem:
        raise FedsegError(problem)
    volume = read_volume(path)
    return CtInput(name=name, source=path, series=None, hu=volume.hu, geometry=volume.geometry)


def _series_input(name: str, folder: Path, files: list[Path]) -> CtInput:
    series = read_series(files)
    return CtInput(name=name, source=folder, series=series, hu=series.hu,
                   geometry=series.geometry)


def write_labels_nifti(labels: np.ndarray, geometry: Geometry, organs: OrganSet,
                       out_dir: Path, predicted: tuple[str, ...] | None = None) -> list[Path]:
    """``labels.nii.gz`` (RAS affine of the grid) and ``labels.json``, atomically.

    ``predicted`` (default: every organ) are the organs the table names: an organ the
    model does not predict is left out, so importing the label map records it unknown
    rather than contoured and absent.
    """
    import nibabel

    from fedseg_clinic.io import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ geometry.matrix()  # LPS -> NIfTI's RAS
    image = nibabel.Nifti1Image(np.ascontiguousarray(labels.transpose(2, 1, 0)), affine)
    image.header.set_xyzt_units("mm")
    path = out_dir / LABELS_NAME
    fd, tmp = tempfile.mkstemp(prefix=".labels.", suffix=".nii.gz", dir=out_dir)
    os.close(fd)
    try:
        nibabel.save(image, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    names = organs.organs if predicted is None else predicted
    table = {"labels": {str(organs.class_index(o)): o for o in organs.organs if o in names},
             "organ_set": organs.to_json()}
    table_path = out_dir / LABELS_TABLE_NAME
    atomic_write_text(table_path, json.dumps(table, indent=2) + "\n")
    return [path, table_path]


def _write_outputs(fmt: str, item: CtInput, labels: np.ndarray, loaded: LoadedModel,
                   out_dir: Path) -> list[Path]:
    organs = loaded.organs
    if fmt == "nifti":
        return write_labels_nifti(labels, item.geometry, organs, out_dir,
                                  loaded.organs_predicted)
    if item.series is None:
        raise FedsegError(f"{item.source}: --format {fmt} needs a DICOM CT series to "
                          "reference; this CT is NIfTI/NRRD (use --format nifti)")
    series = item.series
    # An enhanced (multi-frame) CT: references name the frame of each slice.
    frames = series.frame_numbers if any(f is not None for f in series.frame_numbers) else None
    masks = {o: m for o, m in masks_from_labels(labels, organs).items()
             if m.any() and o in loaded.organs_predicted}
    if fmt == "rtstruct":
        from fedseg_clinic.imaging.rtstruct_writer import build_rtstruct, write_dicom

        ds = build_rtstruct(masks, organs, item.geometry, series.files, series.sop_uids,
                            series.series_uid, series.frame_of_reference_uid,
                            description=f"fedseg {organs.key} {loaded.card.get('run') or ''}"
                            .strip(), frame_numbers=frames)
        return [write_dicom(ds, out_dir / RTSTRUCT_NAME)]
    from fedseg_clinic.imaging.seg_writer import build_seg, write_seg

    seg = build_seg(masks, organs, series.files, frames)
    return [write_seg(seg, out_dir / SEG_NAME)]


def predict_path(
    model: Path | LoadedModel,
    ct_path: Path,
    out: Path,
    fmt: str = "rtstruct",
    progress: Callable[[str], None] | None = None,
) -> list[Prediction]:
    """Segment every patient under ``ct_path`` and write ``fmt`` files under ``out``.

    A single patient's files go into ``out``; with several, each goes into
    ``out/<its folder below ct_path>``. A patient whose CT is unreadable is reported
    (one line through ``progress``) and the others go on; if every patient fails, the
    last error is raised.

    Raises:
        FedsegError: bad format, model or path, or no patient segmented.
    """
    if fmt not in FORMATS:
        raise FedsegError(f"unknown output format {fmt!r} (use {', '.join(FORMATS)})")
    say = progress or (lambda _line: None)
    loaded = model if isinstance(model, LoadedModel) else load_model(Path(model))
    notes: list[str] = []
    inputs = find_ct_inputs(Path(ct_path), notes)
    if loaded.organs_excluded:
        notes.append(f"{loaded.source}: trained on {', '.join(loaded.organs_predicted)} only; "
                     f"not predicted: {', '.join(loaded.organs_excluded)}")
    for note in notes:
        say(f"note: {note}")
    # NIfTI/NRRD input (a file, or volume case folders, which find_ct_inputs prefers)
    # has no DICOM series for an RTSTRUCT or SEG to reference: refuse before any work.
    if fmt != "nifti" and (Path(ct_path).is_file() or find_volume_cases(Path(ct_path))):
        raise FedsegError(f"{ct_path}: --format {fmt} needs a DICOM CT series to reference; "
                          "this CT is NIfTI/NRRD (use --format nifti)")
    results: list[Prediction] = []
    failures: list[str] = []
    for index, (name, loader) in enumerate(inputs, start=1):
        started = time.perf_counter()
        label = name or str(ct_path)
        try:
            item = loader()
            labels = predict_volume(loaded, item.hu, item.geometry)
            outputs = _write_outputs(fmt, item, labels, loaded, out / name if name else out)
        except FedsegError as exc:
            failures.append(str(exc))
            say(f"[{index}/{len(inputs)}] {label}: failed: {exc}")
            continue
        found = [o for o, m in masks_from_labels(labels, loaded.organs).items()
                 if m.any() and o in loaded.organs_predicted]
        seconds = time.perf_counter() - started
        results.append(Prediction(name=name, source=item.source, outputs=outputs,
                                  organs_found=found, seconds=seconds))
        say(f"[{index}/{len(inputs)}] {label}: {len(found)} organ(s) -> {outputs[0]} "
            f"({seconds:.1f} s)")
    if not results:
        raise FedsegError(failures[-1] if failures else f"{ct_path}: nothing to segment")
    return results
