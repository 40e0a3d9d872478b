"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real DICOM/NRRD files beside the checkout (skips when absent)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return REPO_ROOT


def write_head_neck_volumes(src: Path, patients: int = 5, size: int = 24, seed: int = 0) -> Path:
    """Synthetic head-and-neck patients in OpenKBP's layout (NIfTI CT + one mask per ROI).

    Each patient is a soft-tissue block in air with a bony mandible, two parotids, a
    cord and a brainstem at slightly jittered places; OpenKBP's axis order and ROI names.
    """
    import nibabel
    import numpy as np

    rng = np.random.default_rng(seed)
    affine = np.array([[0.0, -3.0, 0.0, 0.0], [-3.0, 0.0, 0.0, 0.0],
                       [0.0, 0.0, -2.5, 0.0], [0.0, 0.0, 0.0, 1.0]])
    for p in range(patients):
        folder = src / f"pt_{p + 1}"
        (folder / "segmentations").mkdir(parents=True)
        shape = (size, size, size)  # (i: A->P, j: R->L, k: S->I)
        ct = np.full(shape, -1000, np.int16)
        ct[2:-2, 2:-2, 1:-1] = 30
        d = rng.integers(-1, 2, size=3)
        c = size // 2
        masks = {name: np.zeros(shape, np.uint8) for name in
                 ("Mandible", "LeftParotid", "RightParotid", "SpinalCord", "Brainstem")}
        masks["Mandible"][4 + d[0]:7 + d[0], c - 6:c + 6, c:c + 4] = 1
        masks["LeftParotid"][c - 2 + d[0]:c + 2 + d[0], c + 4:c + 8, c - 4 + d[2]:c] = 1
        masks["RightParotid"][c - 2 + d[0]:c + 2 + d[0], c - 8:c - 4, c - 4 + d[2]:c] = 1
        masks["SpinalCord"][c + 5:c + 8, c - 1 + d[1]:c + 2 + d[1], c - 2:size - 2] = 1
        masks["Brainstem"][c + 2:c + 7, c - 2 + d[1]:c + 3 + d[1], 2:c - 2] = 1
        ct[masks["Mandible"] > 0] = 700
        ct[(masks["LeftParotid"] | masks["RightParotid"]) > 0] = -40
        ct[masks["SpinalCord"] > 0] = 60
        ct[masks["Brainstem"] > 0] = 45
        nibabel.save(nibabel.Nifti1Image(ct, affine), folder / "ct.nii.gz")
        for name, mask in masks.items():
            nibabel.save(nibabel.Nifti1Image(mask, affine),
                         folder / "segmentations" / f"{name}.nii.gz")
    return src


@pytest.fixture(scope="session")
def head_neck_clinic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clinic folder of 5 synthetic head-and-neck cases imported through NIfTI."""
    from fedseg_clinic.imaging.importer import ImportOptions
    from fedseg_clinic.imaging.volumes import import_volume_clinic

    base = tmp_path_factory.mktemp("head-neck")
    src = write_head_neck_volumes(base / "src")
    report = import_volume_clinic(src, base / "clinic",
                                  ImportOptions(organ_set="head_neck", crop=False,
                                                val_fraction=0.4, salt="test"))
    assert report.ok, [p.line() for p in report.problems]
    return base / "clinic"


@pytest.fixture(scope="session", autouse=True)
def _calibration_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Noise calibrations are cached in a session folder, never in the user's ~/.cache
    (the variable is inherited by the FEDn clients the tests start)."""
    from fedseg_clinic.privacy.accounting import CACHE_ENV

    folder = tmp_path_factory.mktemp("fedseg-cache")
    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    yield folder
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old
