"""The benchmark's specification: clinic knobs, presets, validation, spec files."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedseg_clinic.errors import FedsegError
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
