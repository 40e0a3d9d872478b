"""Cases and whole benchmarks: make one patient, write every clinic atomically."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from fedseg.orchestration.phantoms.anatomy import (
    STREAM_ANATOMY,
    STREAM_SCANNER,
    STREAM_TEXTURE,
    draw_anatomy,
    patient_rng,
)
from fedseg.orchestration.phantoms.dicom import write_case_dicom
from fedseg.orchestration.phantoms.render import Phantom, render_phantom
from fedseg.orchestration.phantoms.scanner import apply_scanner
from fedseg.orchestration.phantoms.spec import (
    BENCHMARK_NAME,
    GENERATOR,
    GENERATOR_VERSION,
    HU_CLIP,
    BenchmarkSpec,
    ClinicSpec,
    spec_to_json,
    validate_spec,
)
from fedseg_clinic.cases import (
    Case,
    CaseMeta,
    Manifest,
    assign_splits,
    manifest_entry,
    write_case,
    write_manifest,
)
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.io import atomic_write_text
from fedseg_clinic.organs import ORGANS, THORAX

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GeneratedClinic:
    """What :func:`generate_benchmark` wrote for one clinic."""

    name: str
    folder: Path
    case_ids: tuple[str, ...]
    n_train: int
    n_val: int

# ----------------------------------------------------------------------------- cases


def case_id(clinic: ClinicSpec, patient_index: int) -> str:
    """The case folder name of a clinic's patient (0-based index)."""
    return f"{clinic.name}-p{patient_index + 1:03d}"


def make_phantom(spec: BenchmarkSpec, clinic_index: int, patient_index: int) -> Phantom:
    """Draw and render one patient of one clinic, before scanner effects."""
    clinic = spec.clinics[clinic_index]
    shape, spacing = spec.grid(clinic)
    anatomy = draw_anatomy(
        patient_rng(spec.seed, clinic_index, patient_index, STREAM_ANATOMY), clinic.size_scale)
    return render_phantom(anatomy, shape, spacing,
                          patient_rng(spec.seed, clinic_index, patient_index, STREAM_TEXTURE))


def make_case(spec: BenchmarkSpec, clinic_index: int, patient_index: int) -> Case:
    """Generate one patient of one clinic as a :class:`Case` (labelled organs only)."""
    clinic = spec.clinics[clinic_index]
    shape, spacing = spec.grid(clinic)
    anatomy = draw_anatomy(
        patient_rng(spec.seed, clinic_index, patient_index, STREAM_ANATOMY), clinic.size_scale)
    phantom = render_phantom(anatomy, shape, spacing,
                             patient_rng(spec.seed, clinic_index, patient_index, STREAM_TEXTURE))
    image = apply_scanner(phantom.hu, clinic, spacing,
                          patient_rng(spec.seed, clinic_index, patient_index, STREAM_SCANNER))
    origin = tuple(float(-(n - 1) / 2.0 * d) for n, d in
                   zip(shape[::-1], spacing[::-1], strict=True))
    cid = case_id(clinic, patient_index)
    labelled = tuple(o for o in ORGANS if o in clinic.labelled_organs)
    meta = CaseMeta(
        case_id=cid,
        patient_pseudonym=cid,
        shape=shape,
        spacing=tuple(float(d) for d in spacing),  # type: ignore[arg-type]
        origin=origin,  # type: ignore[arg-type]
        labelled_organs=labelled,
        source="phantom",
        hu_clip=HU_CLIP,
        extra={
            "generator": GENERATOR,
            "generator_version": GENERATOR_VERSION,
            "seed": spec.seed,
            "clinic": clinic.name,
            "patient_index": patient_index,
            "scanner": {"hu_offset": clinic.hu_offset, "noise_sigma": clinic.noise_sigma,
                        "blur_sigma_mm": clinic.blur_sigma_mm},
            "anatomy": json.loads(json.dumps(dataclasses.asdict(anatomy))),
        },
    )
    masks = {o: phantom.masks[o] for o in labelled}
    return Case(meta=meta, image=image, masks=masks)


def prepare_output(out: Path, overwrite: bool) -> None:
    """Check that ``out`` can receive a benchmark (raises FedsegError otherwise)."""
    if out.exists() and not out.is_dir():
        raise FedsegError(f"{out}: output path exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FedsegError(f"{out}: output folder is not empty (use --overwrite to replace it)")
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise FedsegError(f"{parent}: parent of the output is not a folder")


def generate_benchmark(spec: BenchmarkSpec, out: Path, dicom: bool = False,
                       overwrite: bool = False) -> list[GeneratedClinic]:
    """Generate every clinic of a spec into ``out`` (built aside, then moved into place).

    Layout: ``out/<clinic>/`` case folders + manifest.json, ``out/benchmark.json``, and
    with ``dicom`` ``out/dicom/<clinic>/<case_id>/`` CT slices + RTSTRUCT.

    Args:
        spec: the benchmark.
        out: output folder; must not exist, be empty, or ``overwrite`` must be set.
        dicom: also write DICOM CT + RTSTRUCT per patient.
        overwrite: replace a non-empty ``out``.

    Returns:
        One entry per clinic, with paths inside the final ``out``.
    """
    validate_spec(spec)
    out = Path(os.path.abspath(out))
    prepare_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        results = _generate_into(spec, tmp, out, dicom)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return results


def _generate_into(spec: BenchmarkSpec, tmp: Path, final: Path, dicom: bool
                   ) -> list[GeneratedClinic]:
    results = []
    clinics_json = []
    for ci, clinic in enumerate(spec.clinics):
        folder = tmp / clinic.name
        ids = [case_id(clinic, i) for i in range(clinic.patients)]
        splits = assign_splits(ids, spec.val_fraction, spec.seed + ci)
        entries = []
        for pi in range(clinic.patients):
            case = make_case(spec, ci, pi)
            write_case(case, folder)
            entries.append(manifest_entry(case.meta, splits[case.meta.case_id]))
            if dicom:
                write_case_dicom(case, tmp / "dicom" / clinic.name / case.meta.case_id,
                                 uid_seed=f"{spec.seed}/{clinic.name}",
                                 roi_style=clinic.roi_style)
            logger.info("%s: wrote %s (%d/%d)", clinic.name, case.meta.case_id, pi + 1,
                        clinic.patients)
        manifest = Manifest(clinic=clinic.name, cases=entries, extra={
            "source": "phantom", "generator": GENERATOR, "seed": spec.seed,
            "benchmark": BENCHMARK_NAME, "organ_set": THORAX.to_json(),
        })
        write_manifest(manifest, folder)
        shape, spacing = spec.grid(clinic)
        n_val = sum(1 for e in entries if e.split == "val")
        if n_val == 0 or n_val == len(entries):
            logger.warning("%s: %d case(s), %d in val: one split is empty", clinic.name,
                           len(entries), n_val)
        clinics_json.append({
            "name": clinic.name, "folder": clinic.name, "cases": len(entries),
            "train": len(entries) - n_val, "val": n_val,
            "labelled_organs": list(clinic.labelled_organs),
            "shape": list(shape), "spacing": list(spacing),
        })
        results.append(GeneratedClinic(name=clinic.name, folder=final / clinic.name,
                                       case_ids=tuple(ids), n_train=len(entries) - n_val,
                                       n_val=n_val))
    benchmark = {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "seed": spec.seed,
        "dicom": dicom,
        "spec": spec_to_json(spec),
        "clinics": clinics_json,
    }
    atomic_write_text(tmp / BENCHMARK_NAME, json.dumps(benchmark, indent=2))
    return results
