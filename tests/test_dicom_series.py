"""CT series discovery and reading: real scanner files, compressed syntaxes, bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.imaging.series import Geometry, read_series, scan_folder

CT3 = Path("dcmqi/data/segmentations/ct-3slice")


def _series_paths(folder: Path) -> list[Path]:
    groups = scan_folder(folder).series_files()
    assert len(groups) == 1
    return [f.path for f in next(iter(groups.values()))]


def _copy_slice(src: Path, dst: Path, z: float | None = None, **changes: object) -> None:
    """Copy a CT slice with a new SOPInstanceUID, optionally moved to LPS z."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if z is not None:
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], z]
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(dst)


def test_ct3slice_geometry_and_hu(shared_data: Path) -> None:
    series = read_series(_series_paths(shared_data / CT3))
    g = series.geometry
    assert g.shape == (3, 512, 512)
    assert g.spacing == pytest.approx((1.0, 0.810547, 0.810547), abs=1e-4)
    # Ordered by position along the normal: z increases with the slice index.
    assert g.origin[2] == pytest.approx(-128.69, abs=1e-3)
    assert [p.name for p in series.files] == ["03.dcm", "02.dcm", "01.dcm"]
    assert series.hu.min() == -3024 and series.hu.max() == 1381
    assert np.allclose(np.asarray(g.direction), np.eye(3))


def test_order_ignores_instance_number(shared_data: Path, tmp_path: Path) -> None:
    names = ["01.dcm", "02.dcm", "03.dcm"]
    for i, name in enumerate(names):
        ds = pydicom.dcmread(shared_data / CT3 / name)
        ds.InstanceNumber = [7, 1, 4][i]  # scrambled numbering must not matter
        ds.save_as(tmp_path / name)
    series = read_series(_series_paths(tmp_path))
    zs = [float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in series.files]
    assert zs == sorted(zs)


def test_mock_data_two_slices(shared_data: Path) -> None:
    folder = shared_data / "rt-utils/tests/mock_data"
    series = read_series(_series_paths(folder))
    assert series.geometry.shape == (2, 512, 512)
    assert series.geometry.spacing == pytest.approx((5.0, 0.488281, 0.488281))
    assert series.hu.min() == -3024 and series.hu.max() == 125


@pytest.mark.parametrize("folder, n_slices", [("oriented_data", 3), ("one_slice_data", 1)])
def test_oblique_orientation(shared_data: Path, folder: str, n_slices: int) -> None:
    series = read_series(_series_paths(shared_data / "rt-utils/tests" / folder))
    g = series.geometry
    assert g.shape == (n_slices, 50, 100)
    direction = np.asarray(g.direction)
    # Columns are orthonormal and right-handed; the first two are the IOP vectors.
    assert np.allclose(direction.T @ direction, np.eye(3), atol=1e-5)
    assert np.linalg.det(direction) == pytest.approx(1.0, abs=1e-5)
    assert direction[:, 0] == pytest.approx([0.9541666, -0.2080757, 0.2151061])
    # Every slice's ImagePositionPatient is the grid's voxel (k, 0, 0).
    for k, path in enumerate(series.files):
        ipp = np.asarray([float(v) for v in pydicom.dcmread(path).ImagePositionPatient])
        assert g.index_to_lps(np.array([[k, 0, 0]]))[0] == pytest.approx(ipp, abs=1e-3)
    # RescaleSlope 0.001 is applied.
    assert np.abs(series.hu).max() <= 10.0 and series.hu.dtype == np.float32
    if n_slices == 1:
        assert series.warnings and "SliceThickness" in series.warnings[0]


def test_geometry_round_trip() -> None:
    g = Geometry(shape=(4, 5, 6), spacing=(2.0, 0.5, 0.7), origin=(1.0, -2.0, 3.0),
                 direction=((0.0, 1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.0, -1.0)))
    zyx = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [3.5, -1.0, 0.25]])
    lps = g.index_to_lps(zyx)
    # x axis (column index) runs along LPS y with 0.7 mm steps.
    assert lps[1] - lps[0] == pytest.approx([2 * 0.5, 3 * 0.7, -2.0])
    assert g.lps_to_index(lps) == pytest.approx(zyx)


def test_scan_skips_junk(shared_data: Path, tmp_path: Path) -> None:
    shutil.copytree(shared_data / CT3, tmp_path / "nested" / "ct")
    (tmp_path / "notes.txt").write_text("not dicom")
    (tmp_path / "nested" / "broken.dcm").write_bytes(b"\x00" * 200)
    scan = scan_folder(tmp_path)
    assert len(scan.series_files()) == 1
    assert sorted(p.name for p, _ in scan.skipped) == ["broken.dcm", "notes.txt"]
    assert all("not a DICOM file" in why for _, why in scan.skipped)


def test_scan_skips_localizer(shared_data: Path, tmp_path: Path) -> None:
    shutil.copytree(shared_data / CT3, tmp_path / "ct")
    _copy_slice(shared_data / CT3 / "01.dcm", tmp_path / "scout.dcm",
                ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], SeriesInstanceUID=generate_uid())
    scan = scan_folder(tmp_path)
    assert len(scan.series_files()) == 1
    assert [(p.name, why) for p, why in scan.skipped] == [
        ("scout.dcm", "CT localizer (scout) image, not a slice")]


def test_scan_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FedsegError, match="not a folder"):
        scan_folder(tmp_path / "absent")


@pytest.mark.parametrize(
    "extra_z, message",
    [
        (-128.69, "duplicated slice"),
        (-124.69, "1 missing slice"),
        (-125.19, "uneven slice spacing"),
    ],
)
def test_bad_slice_positions(shared_data: Path, tmp_path: Path, extra_z: float,
                             message: str) -> None:
    for name in ("01.dcm", "02.dcm", "03.dcm"):
        shutil.copy(shared_data / CT3 / name, tmp_path / name)
    _copy_slice(shared_data / CT3 / "01.dcm", tmp_path / "extra.dcm", z=extra_z)
    with pytest.raises(FedsegError, match=message) as info:
        read_series(_series_paths(tmp_path))
    assert ".dcm" in str(info.value)


def test_orientation_mismatch(shared_data: Path, tmp_path: Path) -> None:
    for name in ("01.dcm", "02.dcm"):
        shutil.copy(shared_data / CT3 / name, tmp_path / name)
    _copy_slice(shared_data / CT3 / "03.dcm", tmp_path / "03.dcm",
                ImageOrientationPatient=[0, 1, 0, 1, 0, 0])
    with pytest.raises(FedsegError, match=r"03\.dcm: ImageOrientationPatient differs"):
        read_series(_series_paths(tmp_path))


def test_undecodable_pixels(shared_data: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(shared_data / CT3 / "01.dcm")
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(tmp_path / "short.dcm")
    with pytest.raises(FedsegError, match=r"short\.dcm: cannot decode pixel data"):
        read_series([tmp_path / "short.dcm"])
