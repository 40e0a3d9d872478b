"""RTSTRUCT parsing, reference checks and even-odd rasterisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from matplotlib.path import Path as MplPath

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.imaging.rtstruct import (
    check_reference,
    fill_polygons_even_odd,
    rasterise_contours,
    rasterise_roi,
    read_rtstruct,
    references_series,
)
from fedseg_clinic.imaging.series import Geometry, read_series, scan_folder

MOCK = Path("rt-utils/tests/mock_data")
DICOMPYLER = Path("dicompyler-core/tests/testdata/example_data")


def _square(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)


@pytest.mark.parametrize(
    "polygons, expected",
    [
        ([], 0),
        # Centres 1..3 in x and y: 3 x 3.
        ([_square(0.5, 0.5, 3.5, 3.5)], 9),
        # Half-open: a centre exactly on the left/top edge is in, right/bottom edge out.
        ([_square(1.0, 1.0, 3.0, 3.0)], 4),
        # A hole: 5x5 minus the inner 1x1.
        ([_square(-0.5, -0.5, 4.5, 4.5), _square(1.5, 1.5, 2.5, 2.5)], 24),
        # Two overlapping squares: even-odd = XOR, 9 + 9 - 2 * 4.
        ([_square(0.5, 0.5, 3.5, 3.5), _square(1.5, 1.5, 4.5, 4.5)], 10),
        # Two separate islands on one slice.
        ([_square(0.5, 0.5, 1.5, 1.5), _square(5.5, 5.5, 6.5, 7.5)], 3),
        # Degenerate contours (a line, too few points) fill nothing.
        ([np.array([[0.0, 0.0], [5.0, 5.0]])], 0),
        ([np.array([[0.0, 2.0], [5.0, 2.0], [2.0, 2.0]])], 0),
        # Partly outside the image: clipped, no error.
        ([_square(-10.0, -10.0, 1.5, 1.5)], 4),
    ],
)
def test_fill_hand_cases(polygons: list[np.ndarray], expected: int) -> None:
    assert int(fill_polygons_even_odd(polygons, (8, 8)).sum()) == expected


def test_fill_triangle_rows() -> None:
    triangle = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    mask = fill_polygons_even_odd([triangle], (5, 5))
    # Row y: centres x with 0 <= x < 4 - y.
    assert mask.sum(axis=1).tolist() == [4, 3, 2, 1, 0]


def test_fill_matches_matplotlib() -> None:
    """Random star polygons, several per slice, against matplotlib's even-odd XOR."""
    rng = np.random.default_rng(0)
    ny, nx = 40, 50
    yy, xx = np.mgrid[0:ny, 0:nx]
    centres = np.column_stack([xx.ravel(), yy.ravel()]).astype(float)
    total_diff = 0
    total = 0
    for _ in range(10):
        polygons = []
        expected = np.zeros(ny * nx, dtype=bool)
        for _ in range(3):
            n = int(rng.integers(3, 12))
            angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            radius = rng.uniform(3, 15, n)
            centre = rng.uniform(5, 40, 2)
            poly = centre + np.column_stack([np.cos(angles), np.sin(angles)]) * radius[:, None]
            poly += rng.uniform(-0.01, 0.01, poly.shape)  # avoid exact edge hits
            polygons.append(poly)
            expected ^= MplPath(poly).contains_points(centres)
        ours = fill_polygons_even_odd(polygons, (ny, nx)).ravel()
        total_diff += int(np.count_nonzero(ours != expected))
        total += int(expected.sum())
    assert total > 1000
    assert total_diff == 0


def _mock_series(shared_data: Path):
    groups = scan_folder(shared_data / MOCK).series_files()
    return read_series([f.path for f in next(iter(groups.values()))])


def test_rt_utils_mock_roi(shared_data: Path) -> None:
    series = _mock_series(shared_data)
    ss = read_rtstruct(shared_data / MOCK / "rt.dcm")
    assert references_series(ss, series)
    check_reference(ss, series)
    assert [r.name for r in ss.rois] == ["ROI-1"]
    result = rasterise_roi(ss.rois[0], series.geometry)
    # README: about 1,443 voxels by even-odd fill, all on the first slice.
    assert int(result.mask.sum()) == pytest.approx(1443, rel=0.02)
    assert int(result.mask[1].sum()) == 0
    assert result.warnings("ROI-1") == []


@pytest.mark.parametrize("name", ["invalid_reference_rt.dcm", "non_existent_reference_rt.dcm"])
def test_broken_references(shared_data: Path, name: str) -> None:
    series = _mock_series(shared_data)
    ss = read_rtstruct(shared_data / MOCK / name)
    with pytest.raises(FedsegError, match=f"{name}: RTSTRUCT references .* image"):
        check_reference(ss, series)


def test_reference_to_other_series(shared_data: Path) -> None:
    groups = scan_folder(shared_data / "dcmqi/data/segmentations/ct-3slice").series_files()
    other = read_series([f.path for f in next(iter(groups.values()))])
    ss = read_rtstruct(shared_data / MOCK / "rt.dcm")
    assert not references_series(ss, other)
    with pytest.raises(FedsegError, match=r"rt\.dcm: RTSTRUCT references CT series"):
        check_reference(ss, other)


def test_not_an_rtstruct(shared_data: Path) -> None:
    with pytest.raises(FedsegError, match=r"ct_1\.dcm: not an RTSTRUCT"):
        read_rtstruct(shared_data / MOCK / "ct_1.dcm")


def test_dicompyler_clinical_volumes(shared_data: Path) -> None:
    ct = pydicom.dcmread(shared_data / DICOMPYLER / "ct.0.dcm")
    ss = read_rtstruct(shared_data / DICOMPYLER / "rtss.dcm")
    assert len(ss.rois) == 10
    top_z = float(ct.ImagePositionPatient[2])
    spacing = float(ct.PixelSpacing[0])
    grid = Geometry(
        shape=(98, int(ct.Rows), int(ct.Columns)),
        spacing=(3.0, spacing, float(ct.PixelSpacing[1])),
        origin=(float(ct.ImagePositionPatient[0]), float(ct.ImagePositionPatient[1]),
                top_z - 97 * 3.0),
        direction=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)),
    )
    voxel_cc = 3.0 * spacing * float(ct.PixelSpacing[1]) / 1000.0
    volumes = {}
    for roi in ss.rois:
        result = rasterise_roi(roi, grid)
        volumes[roi.name] = result.mask.sum() * voxel_cc
        assert result.outside == 0 and result.off_plane == 0
    assert volumes["BODY"] == pytest.approx(14900, rel=0.02)
    assert volumes["Lt Lung"] == pytest.approx(2000, rel=0.03)
    assert volumes["Heart"] == pytest.approx(440, rel=0.03)
    assert volumes["Breast"] == pytest.approx(401, rel=0.03)
    assert volumes["Areola"] == 0
    # BODY on the top slice (ct.0): soft tissue inside, air outside.
    body_top = rasterise_roi(next(r for r in ss.rois if r.name == "BODY"), grid).mask[97]
    hu = ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    assert hu[body_top].mean() == pytest.approx(2, abs=30)
    assert hu[~body_top].mean() == pytest.approx(-950, abs=40)


def test_points_and_lines_warn(shared_data: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(shared_data / MOCK / "rt.dcm")
    for contour in ds.ROIContourSequence[0].ContourSequence:
        contour.ContourGeometricType = "OPEN_PLANAR"
    ds.save_as(tmp_path / "open.dcm")
    series = _mock_series(shared_data)
    roi = read_rtstruct(tmp_path / "open.dcm").rois[0]
    result = rasterise_roi(roi, series.geometry)
    assert not result.mask.any()
    lines = result.warnings("ROI-1")
    assert any("point/line contour" in line for line in lines)
    assert any("empty mask" in line for line in lines)


def test_contour_outside_volume(shared_data: Path) -> None:
    series = _mock_series(shared_data)
    square = np.array([[-10.0, -10.0, 0.0], [10.0, -10.0, 0.0], [10.0, 10.0, 0.0],
                       [-10.0, 10.0, 0.0]])
    far = square + np.array([0.0, 0.0, 200.0])  # no slice there
    edge = square + np.array([-120.0, 0.0, 60.0])  # crosses the left border of slice 0
    result = rasterise_contours([far, edge], series.geometry)
    assert result.outside == 2
    assert result.mask[0].any() and not result.mask[1].any()
    assert result.mask[0][:, 0].any()  # clipped at the border, not dropped


def test_off_plane_contour_skipped(shared_data: Path) -> None:
    series = _mock_series(shared_data)
    tilted = np.array([[0.0, 0.0, 60.0], [10.0, 0.0, 61.0], [10.0, 10.0, 63.0]])
    result = rasterise_contours([tilted], series.geometry)
    assert result.off_plane == 1 and not result.mask.any()


def test_oblique_grid_contour() -> None:
    """A square drawn in an oblique grid's plane fills the expected voxels."""
    angle = np.deg2rad(30.0)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0.0],
                          [np.sin(angle), np.cos(angle), 0.0],
                          [0.0, 0.0, 1.0]])
    grid = Geometry(shape=(3, 10, 12), spacing=(2.0, 1.5, 1.0), origin=(5.0, -3.0, 7.0),
                    direction=tuple(tuple(r) for r in direction))
    # Corners in (z, y, x) index space around centres y 2..4, x 3..7 of slice 1.
    corners = np.array([[1, 1.5, 2.5], [1, 1.5, 7.5], [1, 4.5, 7.5], [1, 4.5, 2.5]])
    result = rasterise_contours([grid.index_to_lps(corners)], grid)
    assert int(result.mask.sum()) == 3 * 5
    assert result.mask[1, 2:5, 3:8].all()
