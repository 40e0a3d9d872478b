"""NIfTI/NRRD label maps in patient coordinates, resampled onto CT grids."""

from __future__ import annotations

from pathlib import Path

import nibabel
import nrrd
import numpy as np
import pytest

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.imaging.labelmap import (
    bounds_overlap,
    dicom_seg_to_grid,
    labelmap_to_grid,
    read_dicom_seg,
    read_labelmap,
)
from fedseg_clinic.imaging.series import CtSeries, Geometry, read_series, scan_folder

SEGS = Path("dcmqi/data/segmentations")
CT3_DIR = SEGS / "ct-3slice"


def _series(folder: Path) -> CtSeries:
    groups = scan_folder(folder).series_files()
    return read_series([f.path for f in next(iter(groups.values()))])


@pytest.fixture(scope="module")
def ct3(shared_data: Path) -> CtSeries:
    return _series(shared_data / CT3_DIR)


@pytest.mark.parametrize(
    "name, label, voxels, mean_hu",
    [
        ("liver_seg.nrrd", 1, 107098, 37.0),
        ("spine_seg.nrrd", 2, 12439, 328.0),
        ("heart_seg.nrrd", 3, 41449, None),
    ],
)
def test_dcmqi_nrrd_on_ct_grid(shared_data: Path, ct3: CtSeries, name: str, label: int,
                               voxels: int, mean_hu: float | None) -> None:
    lm = read_labelmap(shared_data / SEGS / name)
    assert list(lm.names) == [label]
    assert lm.names[label] == name.split("_")[0]
    grid = labelmap_to_grid(lm, ct3.geometry)
    assert grid.shape == ct3.hu.shape
    # Same grid: every labelled voxel lands on the CT, none lost or added.
    assert int(np.count_nonzero(grid == label)) == voxels
    assert int(np.count_nonzero(grid == label)) == int(np.count_nonzero(lm.labels == label))
    if mean_hu is not None:
        assert float(ct3.hu[grid == label].mean()) == pytest.approx(mean_hu, abs=2.0)


def test_multilabel_names(shared_data: Path, ct3: CtSeries) -> None:
    lm = read_labelmap(shared_data / SEGS / "liver_spine_seg.nrrd")
    assert lm.names == {1: "liver_spine 1", 2: "liver_spine 2"}
    grid = labelmap_to_grid(lm, ct3.geometry)
    assert np.bincount(grid.ravel())[1:3].tolist() == [107098, 12439]


@pytest.mark.parametrize("folder", ["23x38x3", "24x38x3"])
def test_odd_sized_grids(shared_data: Path, folder: str) -> None:
    series = _series(shared_data / SEGS / folder / "image")
    lm = read_labelmap(shared_data / SEGS / folder / "nrrd" / "label.nrrd")
    assert bounds_overlap(lm, series.geometry)
    grid = labelmap_to_grid(lm, series.geometry)
    assert int(grid.astype(bool).sum()) == int(np.count_nonzero(lm.labels))


def test_nifti_ras_any_axis_order(shared_data: Path, ct3: CtSeries, tmp_path: Path) -> None:
    """The liver written as NIfTI (RAS), with axes flipped and swapped, lands the same."""
    lm = read_labelmap(shared_data / SEGS / "liver_seg.nrrd")
    expected = labelmap_to_grid(lm, ct3.geometry)
    # Reverse axis 0 and swap axes 0/1 of the array, adjusting the affine to match.
    data = lm.labels[::-1].transpose(1, 0, 2)
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, lm.labels.shape[0] - 1
    swap = np.eye(4)[[1, 0, 2, 3]]
    affine_lps = lm.affine @ flip @ swap
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    path = tmp_path / "liver_label.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(data), affine_ras), path)
    nifti = read_labelmap(path)
    assert nifti.names == {1: "liver"}
    assert np.array_equal(labelmap_to_grid(nifti, ct3.geometry), expected)


def test_nearest_neighbour_downsampling(tmp_path: Path) -> None:
    """A 2x finer label map: each coarse voxel takes the label at its centre."""
    fine = np.zeros((8, 8, 4), dtype=np.int16)  # (i, j, k) = (x, y, z)
    fine[2:6, 0:8, :] = 1
    header = {"space": "left-posterior-superior",
              "space directions": np.diag([0.5, 0.5, 1.0]),
              "space origin": np.array([-0.25, -0.25, 0.0])}
    nrrd.write(str(tmp_path / "box_seg.nrrd"), fine, header)
    lm = read_labelmap(tmp_path / "box_seg.nrrd")
    coarse = Geometry(shape=(4, 4, 4), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                      direction=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
    grid = labelmap_to_grid(lm, coarse)
    # Coarse x centre c sits at fine index 2c + 0.5: labelled for c = 1, 2 only.
    assert grid[0, 0].tolist() == [0, 1, 1, 0]
    assert int(grid.sum()) == 4 * 4 * 2


def test_outside_grid_is_zero(shared_data: Path, ct3: CtSeries) -> None:
    lm = read_labelmap(shared_data / SEGS / "24x38x3" / "nrrd" / "label.nrrd")
    assert not bounds_overlap(lm, ct3.geometry)
    assert not labelmap_to_grid(lm, ct3.geometry).any()


def test_float_image_rejected(tmp_path: Path) -> None:
    data = np.full((3, 3, 3), 0.5, dtype=np.float32)
    nibabel.save(nibabel.Nifti1Image(data, np.eye(4)), tmp_path / "image_seg.nii")
    with pytest.raises(FedsegError, match=r"image_seg\.nii: label map holds non-integer"):
        read_labelmap(tmp_path / "image_seg.nii")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad_seg.nrrd", b"NRRD0004\ngarbage\n", "cannot read NRRD"),
        ("bad_seg.nii.gz", b"not gzip", "cannot read NIfTI"),
        ("bad_seg.mha", b"", "unknown label map format"),
    ],
)
def test_unreadable_files(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(FedsegError, match=message) as info:
        read_labelmap(tmp_path / name)
    assert name in str(info.value)


def test_nrrd_without_patient_space(tmp_path: Path) -> None:
    nrrd.write(str(tmp_path / "x_seg.nrrd"), np.zeros((2, 2, 2), dtype=np.uint8))
    with pytest.raises(FedsegError, match="not a patient space"):
        read_labelmap(tmp_path / "x_seg.nrrd")


# --- DICOM SEG ------------------------------------------------------------------------


def test_dicom_seg_liver_matches_nrrd(shared_data: Path, ct3: CtSeries) -> None:
    seg = read_dicom_seg(shared_data / SEGS / "liver.dcm")
    assert seg.names == {1: "Liver"}
    assert seg.series_uids == [ct3.series_uid]
    masks = dicom_seg_to_grid(seg, ct3.geometry)
    nrrd_grid = labelmap_to_grid(read_labelmap(shared_data / SEGS / "liver_seg.nrrd"),
                                 ct3.geometry)
    assert int(masks[1].sum()) == 107098
    assert np.array_equal(masks[1], nrrd_grid == 1)


def test_dicom_seg_overlapping_segments(shared_data: Path, ct3: CtSeries) -> None:
    """Five overlapping segments; dcmqi's three NRRDs hold the same voxels."""
    masks = dicom_seg_to_grid(read_dicom_seg(shared_data / SEGS / "partial_overlaps.dcm"),
                              ct3.geometry)
    for i in (1, 2, 3):
        grid = labelmap_to_grid(read_labelmap(shared_data / SEGS / f"partial_overlaps-{i}.nrrd"),
                                ct3.geometry)
        for number in np.unique(grid[grid > 0]):
            assert np.array_equal(masks[int(number)], grid == number)
    assert masks[1].sum() == 9602 and (masks[1] & masks[2]).any()


@pytest.mark.parametrize("seg_path, nrrd_path", [
    ("24x38x3/seg/label.seg", "24x38x3/nrrd/label.nrrd"),
    ("23x38x3/seg/label.seg", "23x38x3/nrrd/label.nrrd"),
    ("sparse-labelmap-ppv5.dcm", "sparse_labelmap_ppv5_seg.nrrd"),  # LABELMAP type
])
def test_dicom_seg_small_grids(shared_data: Path, seg_path: str, nrrd_path: str) -> None:
    folder = "23x38x3" if seg_path.startswith("23") else "24x38x3"
    series = _series(shared_data / SEGS / folder / "image")
    masks = dicom_seg_to_grid(read_dicom_seg(shared_data / SEGS / seg_path), series.geometry)
    grid = labelmap_to_grid(read_labelmap(shared_data / SEGS / nrrd_path), series.geometry)
    assert masks[1].any()
    assert np.array_equal(masks[1], grid == 1)


def test_dicom_seg_not_parallel(shared_data: Path) -> None:
    seg = read_dicom_seg(shared_data / SEGS / "24x38x3/seg/label.seg")
    tilted = Geometry(shape=(3, 38, 24), spacing=(2.5, 0.7, 0.7), origin=(0.0, 0.0, 0.0),
                      direction=((1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, -1.0, 0.0)))
    with pytest.raises(FedsegError, match="not parallel"):
        dicom_seg_to_grid(seg, tilted)


def test_dicom_seg_rejects_ct(shared_data: Path) -> None:
    with pytest.raises(FedsegError, match=r"01\.dcm: not a DICOM SEG"):
        read_dicom_seg(shared_data / CT3_DIR / "01.dcm")
