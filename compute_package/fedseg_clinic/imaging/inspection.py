"""Statistics of a case folder or a whole clinic folder (``fedseg data inspect``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from fedseg_clinic.cases import CASE_META_NAME, MANIFEST_NAME, read_case, read_manifest
from fedseg_clinic.errors import FedsegError


@dataclasses.dataclass
class OrganStats:
    """One organ of one case: voxel count and volume."""

    voxels: int
    volume_cc: float


@dataclasses.dataclass
class CaseStats:
    """One case: geometry, HU range and organ volumes (labelled organs only)."""

    case_id: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    hu_min: int
    hu_max: int
    hu_mean: float
    organs: dict[str, OrganStats]
    unmapped_rois: tuple[str, ...]
    split: str = ""


@dataclasses.dataclass
class ClinicStats:
    """A clinic folder: its cases and totals per organ."""

    clinic: str
    cases: list[CaseStats]
    n_train: int
    n_val: int
    total_voxels: int
    organ_cases: dict[str, int]
    organ_volume_cc: dict[str, float]


def case_stats(case_dir: Path) -> CaseStats:
    """Statistics of one case folder.

    Raises:
        FedsegError: if the folder is not a readable case.
    """
    case = read_case(case_dir)
    voxel_cc = float(np.prod(case.meta.spacing)) / 1000.0
    organs = {}
    for organ in case.meta.labelled_organs:
        count = int(np.count_nonzero(case.masks[organ]))
        organs[organ] = OrganStats(voxels=count, volume_cc=count * voxel_cc)
    image = case.image
    return CaseStats(
        case_id=case.meta.case_id,
        shape=tuple(int(v) for v in image.shape),  # type: ignore[arg-type]
        spacing=tuple(float(v) for v in case.meta.spacing),  # type: ignore[arg-type]
        hu_min=int(image.min()) if image.size else 0,
        hu_max=int(image.max()) if image.size else 0,
        hu_mean=float(image.mean()) if image.size else 0.0,
        organs=organs,
        unmapped_rois=tuple(case.meta.unmapped_rois),
    )


def clinic_stats(cases_dir: Path) -> ClinicStats:
    """Statistics of every case in a clinic folder's manifest, plus totals."""
    manifest = read_manifest(cases_dir)
    cases = []
    for entry in manifest.cases:
        stats = case_stats(cases_dir / entry.case_id)
        stats.split = entry.split
        cases.append(stats)
    organ_cases: dict[str, int] = {}
    organ_volume: dict[str, float] = {}
    for stats in cases:
        for organ, organ_stats in stats.organs.items():
            organ_cases[organ] = organ_cases.get(organ, 0) + 1
            organ_volume[organ] = organ_volume.get(organ, 0.0) + organ_stats.volume_cc
    return ClinicStats(
        clinic=manifest.clinic,
        cases=cases,
        n_train=sum(1 for c in cases if c.split == "train"),
        n_val=sum(1 for c in cases if c.split == "val"),
        total_voxels=sum(int(np.prod(c.shape)) for c in cases),
        organ_cases=organ_cases,
        organ_volume_cc=organ_volume,
    )


def inspect_path(path: Path) -> CaseStats | ClinicStats:
    """Statistics of a case folder (has case.json) or a clinic folder (has manifest.json).

    Raises:
        FedsegError: if ``path`` is neither.
    """
    if (path / CASE_META_NAME).is_file():
        return case_stats(path)
    if (path / MANIFEST_NAME).is_file():
        return clinic_stats(path)
    raise FedsegError(f"{path}: neither a case folder ({CASE_META_NAME}) nor a clinic folder "
                      f"({MANIFEST_NAME})")


def to_json(stats: CaseStats | ClinicStats) -> dict[str, Any]:
    """Plain-JSON form of the statistics."""
    return dataclasses.asdict(stats)
