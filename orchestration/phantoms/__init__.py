"""Synthetic multi-clinic thoracic CT benchmark: anatomy, clinic heterogeneity, writer.

Every patient is an analytic thorax drawn on a voxel grid with numpy (ellipses,
superellipses, distance-to-segment tubes; no Python loops over voxels): air outside the
body (-1000 HU), subcutaneous fat (-100), muscle/soft tissue (40), ribs, sternum and
vertebrae as bone (700) around the spinal canal (CSF 10) with the spinal cord (30)
inside, lungs (-860) with a vessel texture (intersections of two smooth random
fields' zero sets, 30 HU), the heart (40) with a contrast blood pool (250), the
esophagus (40, a small tube anterior-left of the spine, sometimes with air), the
descending aorta (250), trachea and main bronchi (air), mediastinal fat (-80) and the
upper abdomen below the diaphragm domes (liver 55, sometimes a stomach gas bubble).

Axes and coordinates follow the case format (:mod:`fedseg_clinic.cases`): arrays
are (z, y, x), slices axial, LPS patient coordinates in mm: x grows toward the patient's
left (the left lung sits at larger x), y from anterior to posterior, z from inferior to
superior (slice 0 is the most inferior). The grid is centred on (0, 0, 0).

Per-patient anatomy (overall size, body shape, fat thickness, organ sizes, positions,
heart rotation, diaphragm heights, esophageal air, stomach gas) is drawn from the seed
with ``SeedSequence(seed, spawn_key=(clinic, patient, stream))``: anatomy, texture and
scanner noise use separate streams, so changing a scanner knob never changes a
patient's anatomy, and the same seed gives byte-identical arrays.

Per-clinic heterogeneity knobs (:class:`ClinicSpec`):

- ``hu_offset``: scanner calibration offset added to every voxel (HU).
- ``noise_sigma``: standard deviation of white Gaussian noise (HU), added after blur.
- ``blur_sigma_mm``: Gaussian point-spread sigma in mm (reconstruction kernel), applied
  along all three axes in voxel units of that clinic's grid.
- ``slice_spacing_mm``: z spacing; the scan always covers ``z_extent_mm``, so a clinic
  with thicker slices has fewer slices. ``None`` means ``z_extent_mm / size``.
- ``patients``: number of patients (quantity skew; presets draw it from a Dirichlet).
- ``size_scale``: mean patient size factor (population; each patient adds ~6 % jitter).
- ``labelled_organs``: the label protocol. Organs a clinic does not contour are left out
  of ``labelled_organs`` and of the masks (partial labels: unknown, not absent).
- ``roi_style``: ROI naming convention used in the RTSTRUCT when writing DICOM.

Presets (:func:`preset_spec`): ``iid`` gives every clinic the reference knobs and the
same number of patients; ``non-iid`` cycles three scanner archetypes, draws patient
counts from a Dirichlet (largest first) and removes spinal cord and esophagus from the
last clinic's label protocol. docs/phantoms.md explains the choice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from fedseg.orchestration.phantoms.dicom import write_case_dicom
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
from fedseg_clinic.organs import ORGANS

logger = logging.getLogger(__name__)

GENERATOR = "fedseg.orchestration.phantoms"
GENERATOR_VERSION = 1
BENCHMARK_NAME = "benchmark.json"
PRESETS: tuple[str, ...] = ("iid", "non-iid")
ROI_STYLES: tuple[str, ...] = ("aapm", "upper", "short")
MIN_SIZE = 16
MAX_SIZE = 512
# Rendering keeps a few dozen full-volume temporaries: 256^3 peaks at about 1.2 GB.
MAX_VOXELS = 256**3
HU_CLIP: tuple[float, float] = (-1024.0, 3071.0)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Nominal tissue values (HU) before scanner effects.
HU_AIR = -1000.0
HU_FAT = -100.0
HU_MEDIASTINAL_FAT = -80.0
HU_MUSCLE = 40.0
HU_LUNG = -860.0
HU_VESSEL = 30.0
HU_BONE = 700.0
HU_DISC = 80.0
HU_CSF = 10.0
HU_CORD = 30.0
HU_HEART = 40.0
HU_BLOOD_CONTRAST = 250.0
HU_ESOPHAGUS = 40.0
HU_LIVER = 55.0

# Tissue classes of the label map returned by render_phantom (for tests and docs).
TISSUES: tuple[str, ...] = (
    "air", "fat", "muscle", "lung", "vessel", "bone", "disc", "csf", "cord", "heart",
    "blood", "esophagus", "aorta", "airway", "mediastinum", "liver", "gas",
)
_T = {name: i for i, name in enumerate(TISSUES)}
_TISSUE_HU = np.array(
    [HU_AIR, HU_FAT, HU_MUSCLE, HU_LUNG, HU_VESSEL, HU_BONE, HU_DISC, HU_CSF, HU_CORD,
     HU_HEART, HU_BLOOD_CONTRAST, HU_ESOPHAGUS, HU_BLOOD_CONTRAST, HU_AIR,
     HU_MEDIASTINAL_FAT, HU_LIVER, HU_AIR],
    dtype=np.float32,
)


@dataclasses.dataclass(frozen=True)
class ClinicSpec:
    """One synthetic clinic: its scanner, population and label protocol.

    Attributes:
        name: folder name of the clinic (``DIR/<name>``).
        patients: number of patients (cases).
        hu_offset: scanner calibration offset added to every voxel, HU.
        noise_sigma: white Gaussian noise standard deviation, HU.
        blur_sigma_mm: Gaussian point-spread sigma in mm (0 = none).
        slice_spacing_mm: z spacing in mm; None = the benchmark default.
        size_scale: mean patient size factor of the population.
        labelled_organs: organs this clinic contours (canonical names).
        roi_style: RTSTRUCT ROI naming convention (one of ROI_STYLES).
    """

    name: str
    patients: int
    hu_offset: float = 0.0
    noise_sigma: float = 15.0
    blur_sigma_mm: float = 1.0
    slice_spacing_mm: float | None = None
    size_scale: float = 1.0
    labelled_organs: tuple[str, ...] = ORGANS
    roi_style: str = "aapm"


@dataclasses.dataclass(frozen=True)
class BenchmarkSpec:
    """Everything the generator needs; written to ``benchmark.json`` and readable back.

    Attributes:
        seed: non-negative master seed.
        size: in-plane matrix (size x size); default slice count too.
        clinics: the clinics, in folder order.
        fov_mm: in-plane field of view; pixel spacing = fov_mm / size.
        z_extent_mm: craniocaudal scan length, the same for every clinic.
        val_fraction: fraction of each clinic's cases in the validation split.
        preset: the preset the spec came from ("iid", "non-iid" or "custom").
    """

    seed: int
    size: int
    clinics: tuple[ClinicSpec, ...]
    fov_mm: float = 420.0
    z_extent_mm: float = 320.0
    val_fraction: float = 0.2
    preset: str = "custom"

    def pixel_spacing(self) -> float:
        """In-plane pixel spacing in mm."""
        return self.fov_mm / self.size

    def slice_spacing(self, clinic: ClinicSpec) -> float:
        """The clinic's z spacing in mm."""
        if clinic.slice_spacing_mm is not None:
            return float(clinic.slice_spacing_mm)
        return self.z_extent_mm / self.size

    def grid(self, clinic: ClinicSpec) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
        """The clinic's volume shape (z, y, x) and spacing (z, y, x) in mm."""
        dz = self.slice_spacing(clinic)
        nz = max(1, round(self.z_extent_mm / dz))
        d = self.pixel_spacing()
        return (nz, self.size, self.size), (dz, d, d)


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """One patient's anatomy parameters, in mm (x left+, y posterior+, z superior+).

    In-plane positions are relative to the grid centre, z positions to the scan centre.
    """

    body_center: tuple[float, float]
    body_half_axes: tuple[float, float]
    body_exponent: float
    fat_thickness: float
    muscle_thickness: float
    rib_thickness: float
    rib_period: float
    rib_phase: float
    mediastinum_x: float
    mediastinum_half_width: float
    lung_apex_z: float
    dome_z_right: float
    dome_z_left: float
    dome_depth: float
    heart_center: tuple[float, float, float]
    heart_half_axes: tuple[float, float, float]
    heart_angle_deg: float
    blood_pool_fraction: float
    vertebra_center: tuple[float, float]
    vertebra_radius: float
    canal_radius: float
    cord_radius: float
    cord_offset: tuple[float, float]
    esophagus_center: tuple[float, float]
    esophagus_half_axes: tuple[float, float]
    esophagus_drift: float
    esophagus_air: bool
    aorta_center: tuple[float, float]
    aorta_radius: float
    trachea_radius: float
    carina_z: float
    stomach_gas: bool


@dataclasses.dataclass
class Phantom:
    """A rendered patient before scanner effects.

    Attributes:
        hu: float32 (z, y, x) ideal HU values.
        tissue: uint8 (z, y, x) tissue class index into TISSUES.
        masks: all six organs, bool (z, y, x).
    """

    hu: np.ndarray
    tissue: np.ndarray
    masks: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class GeneratedClinic:
    """What :func:`generate_benchmark` wrote for one clinic."""

    name: str
    folder: Path
    case_ids: tuple[str, ...]
    n_train: int
    n_val: int


# ----------------------------------------------------------------------------- specs


def preset_spec(
    preset: str,
    clinics: int,
    patients: int,
    size: int,
    seed: int,
    quantity_skew: float = 1.0,
) -> BenchmarkSpec:
    """Build a benchmark spec from a preset.

    Args:
        preset: "iid" (all clinics alike) or "non-iid" (scanner archetypes, Dirichlet
            quantity skew, partial labels at the last clinic).
        clinics: number of clinics (>= 1).
        patients: patients per clinic (iid) or mean patients per clinic (non-iid: the
            total ``clinics * patients`` is split by a Dirichlet draw).
        size: in-plane matrix size.
        seed: master seed.
        quantity_skew: Dirichlet concentration for the non-iid split (smaller = more
            skewed).

    Returns:
        The validated spec.
    """
    if preset not in PRESETS:
        raise FedsegError(f"preset {preset!r} unknown (choose from {', '.join(PRESETS)})")
    _check_int("clinics", clinics, 1, 64)
    _check_int("patients", patients, 1, 100_000)
    _check_int("seed", seed, 0, 2**63 - 1)
    _check_int("size", size, MIN_SIZE, MAX_SIZE)
    names = [f"clinic-{k + 1}" for k in range(clinics)]
    if preset == "iid":
        specs = tuple(ClinicSpec(name=n, patients=patients) for n in names)
        spec = BenchmarkSpec(seed=seed, size=size, clinics=specs, preset=preset)
        validate_spec(spec)
        return spec
    if not quantity_skew > 0:
        raise FedsegError(f"quantity skew (Dirichlet alpha) must be > 0, got {quantity_skew}")
    counts = dirichlet_counts(clinics * patients, clinics, quantity_skew, seed,
                              minimum=min(3, patients))
    default_dz = BenchmarkSpec.z_extent_mm / size
    specs_list = []
    for k, name in enumerate(names):
        arch = _ARCHETYPES[k % len(_ARCHETYPES)]
        labelled = ORGANS
        if clinics >= 2 and k == clinics - 1:
            labelled = tuple(o for o in ORGANS if o not in _PARTIAL_DROPPED)
        specs_list.append(ClinicSpec(
            name=name,
            patients=counts[k],
            hu_offset=arch["hu_offset"],
            noise_sigma=arch["noise_sigma"],
            blur_sigma_mm=arch["blur_sigma_mm"],
            slice_spacing_mm=round(default_dz * arch["slice_factor"], 4),
            size_scale=arch["size_scale"],
            labelled_organs=labelled,
            roi_style=ROI_STYLES[k % len(ROI_STYLES)],
        ))
    spec = BenchmarkSpec(seed=seed, size=size, clinics=tuple(specs_list), preset=preset)
    validate_spec(spec)
    return spec


# Scanner/population archetypes of the non-iid preset, cycled over the clinics:
# a reference site, a noisy sharp-kernel thick-slice site with small patients, and a
# smooth-kernel thin-slice site with large patients and a negative calibration offset.
_ARCHETYPES: tuple[dict[str, float], ...] = (
    {"hu_offset": 0.0, "noise_sigma": 15.0, "blur_sigma_mm": 1.0, "slice_factor": 1.0,
     "size_scale": 1.0},
    {"hu_offset": 60.0, "noise_sigma": 50.0, "blur_sigma_mm": 0.0, "slice_factor": 2.0,
     "size_scale": 0.85},
    {"hu_offset": -50.0, "noise_sigma": 6.0, "blur_sigma_mm": 4.0, "slice_factor": 0.625,
     "size_scale": 1.15},
)
# The small, hard organs a "partial" clinic does not contour.
_PARTIAL_DROPPED: tuple[str, ...] = ("spinal_cord", "esophagus")


def dirichlet_counts(total: int, parts: int, alpha: float, seed: int, minimum: int = 1
                     ) -> list[int]:
    """Split ``total`` items into ``parts`` counts by a Dirichlet draw, largest first.

    Each part gets at least ``minimum``; the rest is multinomial with Dirichlet(alpha)
    proportions. Deterministic in ``seed``.
    """
    if total < parts * minimum:
        raise FedsegError(
            f"cannot give {parts} clinics at least {minimum} patients each from {total}"
        )
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(10_000,)))
    props = rng.dirichlet(np.full(parts, float(alpha)))
    extra = rng.multinomial(total - parts * minimum, props)
    return sorted((int(minimum + e) for e in extra), reverse=True)


def with_clinic_knobs(spec: BenchmarkSpec, **knobs: Sequence[Any] | None) -> BenchmarkSpec:
    """Override per-clinic knobs; each value is one entry for all clinics or one per clinic.

    Args:
        spec: the spec to modify.
        **knobs: ClinicSpec field name -> sequence of values (length 1 or the number of
            clinics); None leaves the field alone.

    Returns:
        A new, validated spec.
    """
    clinics = list(spec.clinics)
    fields = {f.name for f in dataclasses.fields(ClinicSpec)}
    given = {k: v for k, v in knobs.items() if v is not None}
    for key, values in given.items():
        if key not in fields or key == "name":
            raise FedsegError(f"unknown clinic knob {key!r}")
        values = list(values)
        if len(values) not in (1, len(clinics)):
            raise FedsegError(
                f"{key}: give 1 value or {len(clinics)} (one per clinic), got {len(values)}"
            )
        for k in range(len(clinics)):
            value = values[0] if len(values) == 1 else values[k]
            clinics[k] = dataclasses.replace(clinics[k], **{key: value})
    preset = spec.preset
    if given and preset in PRESETS:
        preset = f"{preset}+custom"
    new = dataclasses.replace(spec, clinics=tuple(clinics), preset=preset)
    validate_spec(new)
    return new


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FedsegError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise FedsegError(f"{name} must be between {low} and {high}, got {value}")


def _check_float(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value):
        raise FedsegError(f"{name} must be a number, got {value!r}")
    if not low <= value <= high:
        raise FedsegError(f"{name} must be between {low} and {high}, got {value}")


def validate_spec(spec: BenchmarkSpec) -> None:
    """Raise FedsegError naming the first bad value of a spec."""
    _check_int("seed", spec.seed, 0, 2**63 - 1)
    _check_int("size", spec.size, MIN_SIZE, MAX_SIZE)
    _check_float("fov_mm", spec.fov_mm, 100.0, 1000.0)
    _check_float("z_extent_mm", spec.z_extent_mm, 50.0, 1000.0)
    _check_float("val_fraction", spec.val_fraction, 0.0, 0.95)
    if not spec.clinics:
        raise FedsegError("a benchmark needs at least one clinic")
    seen: set[str] = set()
    for clinic in spec.clinics:
        where = f"clinic {clinic.name!r}"
        if not isinstance(clinic.name, str) or not _NAME_RE.match(clinic.name) or (
                clinic.name == "dicom"):
            raise FedsegError(f"clinic name {clinic.name!r} is not a plain folder name")
        if clinic.name in seen:
            raise FedsegError(f"clinic name {clinic.name!r} used twice")
        seen.add(clinic.name)
        _check_int(f"{where}: patients", clinic.patients, 1, 100_000)
        _check_float(f"{where}: hu_offset", clinic.hu_offset, -500.0, 500.0)
        _check_float(f"{where}: noise_sigma", clinic.noise_sigma, 0.0, 500.0)
        _check_float(f"{where}: blur_sigma_mm", clinic.blur_sigma_mm, 0.0, 50.0)
        _check_float(f"{where}: size_scale", clinic.size_scale, 0.5, 1.25)
        if clinic.slice_spacing_mm is not None:
            _check_float(f"{where}: slice_spacing_mm", clinic.slice_spacing_mm, 0.1, 50.0)
        nz = spec.grid(clinic)[0][0]
        if not 4 <= nz <= 2048:
            raise FedsegError(
                f"{where}: slice spacing {spec.slice_spacing(clinic):g} mm over "
                f"{spec.z_extent_mm:g} mm gives {nz} slices (need 4..2048)"
            )
        voxels = nz * spec.size * spec.size
        if voxels > MAX_VOXELS:
            raise FedsegError(
                f"{where}: {nz}x{spec.size}x{spec.size} = {voxels / 1e6:.0f} M voxels per "
                f"patient exceeds {MAX_VOXELS / 1e6:.0f} M (use a smaller size or thicker "
                f"slices)"
            )
        organs = tuple(clinic.labelled_organs)
        unknown = [o for o in organs if o not in ORGANS]
        if unknown:
            raise FedsegError(f"{where}: unknown organ(s) {', '.join(map(str, unknown))} "
                              f"(known: {', '.join(ORGANS)})")
        if not organs or len(set(organs)) != len(organs):
            raise FedsegError(f"{where}: labelled_organs must be non-empty without repeats")
        if clinic.roi_style not in ROI_STYLES:
            raise FedsegError(f"{where}: roi_style {clinic.roi_style!r} unknown "
                              f"(choose from {', '.join(ROI_STYLES)})")


def spec_to_json(spec: BenchmarkSpec) -> dict[str, Any]:
    """Plain-JSON form of a spec (readable back by :func:`spec_from_mapping`)."""
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def spec_from_mapping(data: Any, where: str) -> BenchmarkSpec:
    """Build and validate a spec from parsed YAML/JSON; ``where`` names the source."""
    if isinstance(data, Mapping) and "spec" in data and "generator" in data:
        data = data["spec"]  # a benchmark.json written by this module
    if not isinstance(data, Mapping):
        raise FedsegError(f"{where}: spec must be a mapping")
    top = {f.name for f in dataclasses.fields(BenchmarkSpec)}
    clinic_fields = {f.name for f in dataclasses.fields(ClinicSpec)}
    unknown = sorted(set(data) - top)
    if unknown:
        raise FedsegError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}")
    raw_clinics = data.get("clinics")
    if not isinstance(raw_clinics, list) or not raw_clinics:
        raise FedsegError(f"{where}: 'clinics' must be a non-empty list")
    clinics = []
    for k, item in enumerate(raw_clinics):
        if not isinstance(item, Mapping):
            raise FedsegError(f"{where}: clinics[{k}] must be a mapping")
        bad = sorted(set(item) - clinic_fields)
        if bad:
            raise FedsegError(f"{where}: clinics[{k}]: unknown key(s) {', '.join(map(str, bad))}")
        kwargs = dict(item)
        kwargs.setdefault("name", f"clinic-{k + 1}")
        if "patients" not in kwargs:
            raise FedsegError(f"{where}: clinics[{k}]: 'patients' is required")
        if "labelled_organs" in kwargs:
            if not isinstance(kwargs["labelled_organs"], list):
                raise FedsegError(f"{where}: clinics[{k}]: labelled_organs must be a list")
            kwargs["labelled_organs"] = tuple(kwargs["labelled_organs"])
        clinics.append(ClinicSpec(**kwargs))
    kwargs = {k: v for k, v in data.items() if k != "clinics"}
    for key in ("seed", "size"):
        if key not in kwargs:
            raise FedsegError(f"{where}: {key!r} is required")
    spec = BenchmarkSpec(clinics=tuple(clinics), **kwargs)
    try:
        validate_spec(spec)
    except FedsegError as exc:
        raise FedsegError(f"{where}: {exc}") from None
    return spec


def load_spec(path: Path) -> BenchmarkSpec:
    """Read a YAML or JSON spec file (a benchmark.json is accepted too)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise FedsegError(f"{path}: cannot read spec ({exc.strerror})") from None
    try:
        import yaml

        data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise FedsegError(f"{path}: not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
    return spec_from_mapping(data, str(path))


# ----------------------------------------------------------------------------- anatomy


# Random streams of one patient: anatomy, texture and scanner noise are independent.
STREAM_ANATOMY, STREAM_TEXTURE, STREAM_SCANNER = 0, 1, 2


def patient_rng(seed: int, clinic_index: int, patient_index: int, stream: int
                ) -> np.random.Generator:
    """The generator of one (clinic, patient, stream); same arguments, same numbers."""
    return np.random.default_rng(
        np.random.SeedSequence(seed, spawn_key=(clinic_index, patient_index, stream))
    )


def draw_anatomy(rng: np.random.Generator, size_scale: float = 1.0) -> Anatomy:
    """Draw one patient's anatomy; sizes scale with ``size_scale`` and ~6 % jitter."""
    s = size_scale * float(np.exp(rng.normal(0.0, 0.06)))

    def jit(value: float, rel: float) -> float:
        return float(value * (1.0 + rng.normal(0.0, rel)))

    def shift(sd: float) -> float:
        return float(rng.normal(0.0, sd))

    ax, ay = jit(160.0 * s, 0.05), jit(118.0 * s, 0.05)
    vr = jit(17.0 * s, 0.06)
    vy = 0.42 * ay + shift(3.0)
    canal = jit(8.5 * s, 0.06)
    eso_ax, eso_ay = jit(9.0 * s, 0.12), jit(6.5 * s, 0.12)
    eso_y = vy - vr - eso_ay - 2.5 * s + shift(1.5)
    apex = jit(140.0 * s, 0.04)
    dome_r = -65.0 * s + shift(8.0)
    return Anatomy(
        body_center=(shift(4.0), shift(4.0)),
        body_half_axes=(ax, ay),
        body_exponent=float(rng.uniform(2.1, 2.6)),
        fat_thickness=float(np.clip(jit(14.0 * s, 0.3), 4.0, 40.0)),
        muscle_thickness=jit(11.0 * s, 0.15),
        rib_thickness=jit(10.0, 0.1),
        rib_period=jit(26.0 * s, 0.06),
        rib_phase=float(rng.uniform(0.0, 1.0)),
        mediastinum_x=shift(3.0),
        mediastinum_half_width=jit(16.0 * s, 0.15),
        lung_apex_z=apex,
        dome_z_right=dome_r,
        dome_z_left=dome_r - jit(15.0 * s, 0.3),
        dome_depth=jit(55.0 * s, 0.12),
        heart_center=(jit(22.0 * s, 0.15), -0.2 * ay + shift(4.0), -30.0 * s + shift(6.0)),
        heart_half_axes=(jit(62.0 * s, 0.07), jit(45.0 * s, 0.07), jit(50.0 * s, 0.07)),
        heart_angle_deg=float(rng.uniform(30.0, 50.0)),
        blood_pool_fraction=float(rng.uniform(0.55, 0.7)),
        vertebra_center=(shift(1.5), vy),
        vertebra_radius=vr,
        canal_radius=canal,
        cord_radius=float(min(jit(5.0 * s, 0.08), canal - 1.5)),
        cord_offset=(shift(0.8), shift(0.8)),
        esophagus_center=(jit(6.0 * s, 0.3), eso_y),
        esophagus_half_axes=(eso_ax, eso_ay),
        esophagus_drift=shift(4.0),
        esophagus_air=bool(rng.uniform() < 0.5),
        aorta_center=(jit(26.0 * s, 0.1), vy - 0.6 * vr + shift(2.0)),
        aorta_radius=jit(11.5 * s, 0.1),
        trachea_radius=jit(8.5 * s, 0.08),
        carina_z=jit(40.0 * s, 0.15),
        stomach_gas=bool(rng.uniform() < 0.6),
    )


def _axes(shape: Sequence[int], spacing: Sequence[float]) -> tuple[np.ndarray, ...]:
    """Open (broadcastable) mm coordinate grids z, y, x centred on the volume centre."""
    out = []
    for axis, (n, d) in enumerate(zip(shape, spacing, strict=True)):
        values = ((np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * np.float32(d))
        view = [1, 1, 1]
        view[axis] = n
        out.append(values.reshape(view))
    return tuple(out)


def _superellipse(dx: np.ndarray, dy: np.ndarray, ax: Any, ay: Any, p: float) -> np.ndarray:
    """Inside test |dx/ax|^p + |dy/ay|^p <= 1 (ax, ay may broadcast; <= 0 means empty)."""
    ax = np.maximum(ax, 1e-3)
    ay = np.maximum(ay, 1e-3)
    return (np.abs(dx / ax) ** p + np.abs(dy / ay) ** p) <= 1.0


def _ellipse(dx: np.ndarray, dy: np.ndarray, ax: float, ay: float) -> np.ndarray:
    return (dx / ax) ** 2 + (dy / ay) ** 2 <= 1.0


def _segment_distance(z: np.ndarray, y: np.ndarray, x: np.ndarray,
                      a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """Distance (mm) from every voxel to the segment a-b; points are (x, y, z)."""
    ax_, ay_, az_ = (np.float32(v) for v in a)
    d = np.asarray(b, dtype=np.float32) - np.asarray(a, dtype=np.float32)
    length2 = float(d @ d)
    t = ((x - ax_) * d[0] + (y - ay_) * d[1] + (z - az_) * d[2]) / np.float32(length2)
    t = np.clip(t, 0.0, 1.0)
    return np.sqrt((x - ax_ - t * d[0]) ** 2 + (y - ay_ - t * d[1]) ** 2
                   + (z - az_ - t * d[2]) ** 2)


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], spacing: Sequence[float],
                  sigma_mm: float) -> np.ndarray:
    """Zero-mean, unit-std smooth Gaussian random field (float32)."""
    noise = rng.standard_normal(tuple(shape), dtype=np.float32)
    sigma = [max(0.7, sigma_mm / d) for d in spacing]
    field = ndimage.gaussian_filter(noise, sigma=sigma, mode="wrap")
    std = float(field.std())
    return field / np.float32(std if std > 0 else 1.0)


def render_phantom(anatomy: Anatomy, shape: Sequence[int], spacing: Sequence[float],
                   rng: np.random.Generator) -> Phantom:
    """Draw an anatomy on a (z, y, x) grid centred on the origin.

    Args:
        anatomy: the patient.
        shape: (nz, ny, nx).
        spacing: (dz, dy, dx) in mm.
        rng: texture stream (lung vessels, bone and fat texture, esophageal air).

    Returns:
        Ideal HU, tissue classes and the six organ masks (mutually exclusive except body,
        which contains the others).
    """
    a = anatomy
    shape = tuple(int(n) for n in shape)
    z, y, x = _axes(shape, spacing)
    full = np.zeros(shape, dtype=bool)
    bx, by = a.body_center
    ax, ay = a.body_half_axes
    zt = z / np.float32(160.0)  # ~[-1, 1] over a thorax
    # Body: superellipse, slightly wider toward the shoulders.
    # The body stays a pixel inside the field of view (the operator chooses the FOV so).
    half_x = (shape[2] - 1) / 2.0 * spacing[2] - abs(bx) - spacing[2]
    half_y = (shape[1] - 1) / 2.0 * spacing[1] - abs(by) - spacing[1]
    body_ax = np.minimum(ax * (1.0 + 0.05 * zt), half_x)
    ay = min(ay, half_y)
    dxb, dyb = x - bx, y - by
    body = _superellipse(dxb, dyb, body_ax, ay, a.body_exponent) | full
    inset_fat = a.fat_thickness
    inner = _superellipse(dxb, dyb, body_ax - inset_fat, ay - inset_fat, a.body_exponent) | full
    wall = inset_fat + a.muscle_thickness
    rib_outer = _superellipse(dxb, dyb, body_ax - wall, ay - wall, a.body_exponent)
    wall += a.rib_thickness
    rib_inner = _superellipse(dxb, dyb, body_ax - wall, ay - wall, a.body_exponent)
    cavity = _superellipse(dxb, dyb, body_ax - wall - 3.0, ay - wall - 3.0, a.body_exponent)
    cavity = cavity | full

    # Spine: vertebral body (with discs), canal, posterior ring and spinous process.
    vx, vy = a.vertebra_center
    vr = a.vertebra_radius
    cx, cy = vx, vy + vr + a.canal_radius
    vertebra = _ellipse(x - vx, y - vy, 1.12 * vr, vr) | full
    disc_phase = np.cos(2.0 * np.pi * (z / np.float32(a.rib_period) + a.rib_phase))
    r_canal = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
    canal = (r_canal <= a.canal_radius) | full
    ring = (r_canal <= a.canal_radius + 9.0) | full
    disc = vertebra & (disc_phase > 0.8) & ~ring  # the bony ring stays closed at discs
    spinous = _ellipse(x - cx, y - (cy + a.canal_radius + 14.0), 5.0, 16.0) | full
    cord_x, cord_y = cx + a.cord_offset[0], cy + a.cord_offset[1]
    cord = (np.sqrt((x - cord_x) ** 2 + (y - cord_y) ** 2) <= a.cord_radius) | full
    # A thin organ is never lost between pixel centres: its centre pixel always counts,
    # as a contouring physician would always draw it.
    cord |= _centre_pixels(np.full(shape[0], cord_x), np.full(shape[0], cord_y), shape,
                           spacing)
    canal |= cord
    spine = vertebra | ring | spinous

    # Ribs: a band inside the chest wall, periodic along z, sloping down anteriorly;
    # the sternum closes the band at the anterior midline.
    rib_band = rib_outer & ~rib_inner
    slope = (-(y - by) / np.float32(ay)) * np.float32(0.5 * a.rib_period)
    rib_wave = np.cos(2.0 * np.pi * ((z + slope) / np.float32(a.rib_period) + a.rib_phase))
    anterior_mid = (np.abs(x - bx) < 35.0) & (y < by)
    sternum = rib_band & (np.abs(x - bx) < 16.0) & (y < by)
    ribs = rib_band & (rib_wave > 0.35) & ~anterior_mid

    # Tubes: esophagus (drifting left going down), aorta, trachea and main bronchi.
    ex, ey = a.esophagus_center
    ex_z = ex - a.esophagus_drift * zt
    esophagus = _ellipse(x - ex_z, y - ey, *a.esophagus_half_axes) & ~spine
    eso_centre_x = ex - a.esophagus_drift * z.ravel() / np.float32(160.0)
    esophagus |= _centre_pixels(eso_centre_x, np.full(shape[0], ey), shape, spacing)
    esophagus &= ~canal
    bone = ((spine & ~canal & ~disc & ~esophagus) | ribs | sternum) & body
    eso_lumen = _ellipse(x - ex_z, y - ey, 0.4 * a.esophagus_half_axes[0],
                         0.4 * a.esophagus_half_axes[1]) & esophagus
    if a.esophagus_air:
        gas_z = _smooth_field(rng, (shape[0], 1, 1), (spacing[0], 1.0, 1.0), 20.0) > 0.3
        eso_lumen &= gas_z
    else:
        eso_lumen = np.zeros(shape, dtype=bool)
    aorta = _ellipse(x - a.aorta_center[0], y - a.aorta_center[1],
                     a.aorta_radius, a.aorta_radius) & ~esophagus & ~spine
    tx, ty = ex * 0.3, ey - a.esophagus_half_axes[1] - a.trachea_radius - 2.0
    top = float(z.max()) + 10.0
    airway = _segment_distance(z, y, x, (tx, ty, a.carina_z), (tx, ty, top)) <= a.trachea_radius
    for side in (-1.0, 1.0):
        end = (tx + side * 45.0, ty + 8.0, a.carina_z - 35.0)
        airway |= (_segment_distance(z, y, x, (tx, ty, a.carina_z), end)
                   <= 0.7 * a.trachea_radius)
    airway &= ~esophagus & ~spine & ~aorta

    # Heart: an ellipsoid rotated in the axial plane (long axis toward left-anterior),
    # kept off the esophagus, aorta and spine; contrast blood pool inside.
    hx, hy, hz = a.heart_center
    ang = math.radians(a.heart_angle_deg)
    u = (x - hx) * math.cos(ang) - (y - hy) * math.sin(ang)
    v = (x - hx) * math.sin(ang) + (y - hy) * math.cos(ang)
    w = z - hz
    la, lb, lc = a.heart_half_axes
    heart_q = (u / la) ** 2 + (v / lb) ** 2 + (w / lc) ** 2
    keep_off = esophagus | aorta | spine | airway
    heart = (heart_q <= 1.0) & ~_grow(keep_off, 3.0, spacing) & cavity
    f = a.blood_pool_fraction
    blood = (heart_q <= f * f) & heart

    # Diaphragm domes: lungs live above them; the abdomen below.
    dome_rx, dome_ry = 0.55 * ax, 0.8 * ay
    bowl = 1.0 - ((x - bx) / dome_rx) ** 2 - ((y - by) / dome_ry) ** 2
    dome = np.where(x < a.mediastinum_x, a.dome_z_right, a.dome_z_left) - a.dome_depth * (
        1.0 - np.clip(bowl, 0.0, 1.0))
    above = z > dome
    # Apex: the lungs narrow toward the thoracic inlet.
    taper_start = a.lung_apex_z - 120.0
    r = np.sqrt(np.clip(1.0 - np.clip((z - taper_start) / (a.lung_apex_z - taper_start),
                                      0.0, None) ** 2, 0.0, 1.0))
    mx, mw = a.mediastinum_x, a.mediastinum_half_width
    mediastinal = (np.abs(x - mx) < mw) & (y < vy)
    exclude = _grow(heart | esophagus | aorta | spine | airway, 4.0, spacing) | mediastinal
    lung_cx = 0.5 * (ax - wall + mw)
    lungs = {}
    for organ, side in (("lung_right", -1.0), ("lung_left", 1.0)):
        cx_l = mx + side * lung_cx
        lobe = _superellipse(x - cx_l, y - (by + 5.0), 0.6 * ax * r, 0.95 * ay * r, 2.4)
        on_side = (x - mx) * side > mw
        lungs[organ] = cavity & lobe & on_side & above & ~exclude
    lung_any = lungs["lung_left"] | lungs["lung_right"]

    # Lung texture: vessels where two smooth fields are both near zero (tube network).
    f1 = _smooth_field(rng, shape, spacing, 6.0)
    f2 = _smooth_field(rng, shape, spacing, 6.0)
    vessels = lung_any & (np.abs(f1) < 0.3) & (np.abs(f2) < 0.3)

    # Abdomen below the domes and gas in the stomach (left, just under the dome).
    abdomen = cavity & ~above & ~(spine | aorta | esophagus | heart)
    gas = np.zeros(shape, dtype=bool)
    if a.stomach_gas:
        gas = abdomen & (((x - (bx + 0.35 * ax)) / 28.0) ** 2 + ((y - (by - 0.1 * ay)) / 22.0)
                         ** 2 + ((z - (a.dome_z_left - 22.0)) / 16.0) ** 2 <= 1.0)

    # Tissue map, painted from outside in; later organs win.
    tissue = np.full(shape, _T["air"], dtype=np.uint8)
    tissue[body] = _T["fat"]
    tissue[inner] = _T["muscle"]
    tissue[cavity & above] = _T["mediastinum"]
    tissue[abdomen] = _T["liver"]
    tissue[gas] = _T["gas"]
    tissue[lung_any] = _T["lung"]
    tissue[vessels] = _T["vessel"]
    tissue[(spine | ribs | sternum) & body & ~bone] = _T["muscle"]
    tissue[disc] = _T["disc"]
    tissue[bone] = _T["bone"]
    tissue[canal] = _T["csf"]
    tissue[cord] = _T["cord"]
    tissue[aorta] = _T["aorta"]
    tissue[airway] = _T["airway"]
    tissue[esophagus] = _T["esophagus"]
    tissue[eso_lumen] = _T["airway"]
    tissue[heart] = _T["heart"]
    tissue[blood] = _T["blood"]
    tissue[~body] = _T["air"]

    hu = _TISSUE_HU[tissue]
    # Mild texture so tissues are not flat: fat and bone vary, lungs breathe a little.
    f3 = _smooth_field(rng, shape, spacing, 10.0)
    hu += np.where(tissue == _T["bone"], 60.0, 0.0).astype(np.float32) * f3
    hu += np.where((tissue == _T["fat"]) | (tissue == _T["mediastinum"]), 12.0,
                   0.0).astype(np.float32) * f3
    hu += np.where(tissue == _T["lung"], 20.0, 0.0).astype(np.float32) * f3

    masks = {
        "body": body,
        "lung_left": lungs["lung_left"],
        "lung_right": lungs["lung_right"],
        "heart": heart,
        "spinal_cord": cord & body,
        "esophagus": esophagus & body,
    }
    return Phantom(hu=hu.astype(np.float32), tissue=tissue, masks=masks)


def _centre_pixels(xc: np.ndarray, yc: np.ndarray, shape: Sequence[int],
                   spacing: Sequence[float]) -> np.ndarray:
    """One voxel per slice: the pixel centre nearest to (xc[k], yc[k]) mm."""
    nz, ny, nx = shape
    ix = np.clip(np.rint(np.asarray(xc) / spacing[2] + (nx - 1) / 2.0), 0, nx - 1).astype(int)
    iy = np.clip(np.rint(np.asarray(yc) / spacing[1] + (ny - 1) / 2.0), 0, ny - 1).astype(int)
    out = np.zeros(tuple(shape), dtype=bool)
    out[np.arange(nz), iy, ix] = True
    return out


def _grow(mask: np.ndarray, margin_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Dilate a mask by about ``margin_mm`` (an ellipsoidal margin in voxel units)."""
    radii = [margin_mm / d for d in spacing]
    if max(radii) < 0.5:
        return mask
    ext = [math.floor(r) for r in radii]
    grids = np.ogrid[tuple(slice(-e, e + 1) for e in ext)]
    ball = sum(((g / max(r, 1e-6)) ** 2) for g, r in zip(grids, radii, strict=True)) <= 1.0
    return ndimage.binary_dilation(mask, structure=ball)


def apply_scanner(hu: np.ndarray, clinic: ClinicSpec, spacing: Sequence[float],
                  rng: np.random.Generator) -> np.ndarray:
    """Scanner effects in order blur, noise, offset; rounded and clipped to int16 HU."""
    out = hu.astype(np.float32, copy=True)
    if clinic.blur_sigma_mm > 0:
        sigma = [clinic.blur_sigma_mm / d for d in spacing]
        out = ndimage.gaussian_filter(out, sigma=sigma, mode="nearest")
    if clinic.noise_sigma > 0:
        out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(clinic.noise_sigma)
    out += np.float32(clinic.hu_offset)
    np.rint(out, out=out)
    np.clip(out, HU_CLIP[0], HU_CLIP[1], out=out)
    return out.astype(np.int16)


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
            "benchmark": BENCHMARK_NAME,
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
