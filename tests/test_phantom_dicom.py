"""Phantom cases as DICOM CT + RTSTRUCT: geometry, contours, UIDs, importer round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from matplotlib.path import Path as PolygonPath

from fedseg.cli import cli
from fedseg.orchestration import phantoms as ph
from fedseg.orchestration.phantoms.dicom import (
    CT_IMAGE_STORAGE,
    ROI_NAMES,
    RTSTRUCT_STORAGE,
    mask_to_contours,
    write_case_dicom,
)
from fedseg_clinic.cases import Case, read_case, read_manifest
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.organs import ORGANS, AliasTable


def _even_odd_fill(polygons: list[np.ndarray], xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Test-local rasteriser: pixel centres inside an odd number of polygons."""
    gx, gy = np.meshgrid(xs, ys)
    centres = np.column_stack([gx.ravel(), gy.ravel()])
    inside = np.zeros(len(centres), dtype=bool)
    for polygon in polygons:
        inside ^= PolygonPath(polygon).contains_points(centres)
    return inside.reshape(len(ys), len(xs))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / float(total)


# ----------------------------------------------------------------------------- contours

_BLOCK = np.zeros((6, 6), dtype=bool)
_BLOCK[1:3, 1:3] = True
_RING = np.zeros((7, 7), dtype=bool)
_RING[1:6, 1:6] = True
_RING[3, 3] = False
_TWO = np.zeros((5, 8), dtype=bool)
_TWO[1:3, 1:3] = True
_TWO[2:4, 5:7] = True
_DIAGONAL = np.zeros((5, 5), dtype=bool)
_DIAGONAL[1, 1] = _DIAGONAL[2, 2] = True
_EDGE = np.ones((3, 4), dtype=bool)  # touches every border of the grid
_BAR = np.zeros((3, 6), dtype=bool)
_BAR[1, 1:5] = True


@pytest.mark.parametrize(
    ("mask", "n_contours", "n_points"),
    [
        (np.zeros((4, 4), dtype=bool), 0, []),
        (np.pad(np.ones((1, 1), dtype=bool), 2), 1, [4]),  # one pixel: a diamond
        (_BLOCK, 1, [8]),  # 2x2 block: an octagon
        (_BAR, 1, [6]),  # 1x4 bar: collinear points along the long sides dropped
        (_RING, 2, None),  # outer boundary + hole
        (_TWO, 2, None),  # two regions
        (_EDGE, 1, None),
    ],
)
def test_mask_to_contours_counts(mask: np.ndarray, n_contours: int,
                                 n_points: list[int] | None) -> None:
    xs = np.arange(mask.shape[1]) * 2.0 - 5.0
    ys = np.arange(mask.shape[0]) * 3.0 + 1.0
    polygons = mask_to_contours(mask, xs, ys)
    assert len(polygons) == n_contours
    if n_points is not None:
        assert sorted(len(p) for p in polygons) == n_points
    assert np.array_equal(_even_odd_fill(polygons, xs, ys), mask)
    for polygon in polygons:
        assert not np.array_equal(polygon[0], polygon[-1])  # closed implicitly


def test_single_pixel_contour_coordinates() -> None:
    mask = np.zeros((3, 3), dtype=bool)
    mask[1, 1] = True
    xs, ys = np.array([10.0, 12.0, 14.0]), np.array([-4.0, -1.0, 2.0])
    (polygon,) = mask_to_contours(mask, xs, ys)
    # Half-way to each 4-neighbour's pixel centre, in mm.
    assert {tuple(p) for p in polygon} == {(11.0, -1.0), (13.0, -1.0), (12.0, -2.5),
                                          (12.0, 0.5)}


def test_diagonal_pixels_round_trip() -> None:
    xs, ys = np.arange(5.0), np.arange(5.0)
    assert np.array_equal(_even_odd_fill(mask_to_contours(_DIAGONAL, xs, ys), xs, ys),
                          _DIAGONAL)


@pytest.mark.parametrize("seed", range(6))
def test_random_masks_round_trip_exactly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((20, 24)) < 0.45  # speckle: holes, islands, diagonal contacts
    xs = -30.0 + 1.5 * np.arange(24)
    ys = 7.0 + 0.8 * np.arange(20)
    assert np.array_equal(_even_odd_fill(mask_to_contours(mask, xs, ys), xs, ys), mask)


# ----------------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Case, Path]:
    spec = ph.preset_spec("iid", 1, 1, 32, seed=12)
    case = ph.make_case(spec, 0, 0)
    folder = tmp_path_factory.mktemp("dicom") / case.meta.case_id
    write_case_dicom(case, folder, uid_seed="12/clinic-1", roi_style="upper")
    return case, folder


def _slices(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.glob("CT.*.dcm"))]


def test_ct_geometry_and_pixels(written: tuple[Case, Path]) -> None:
    case, folder = written
    slices = _slices(folder)
    nz, ny, nx = case.image.shape
    dz, dy, dx = case.meta.spacing
    ox, oy, oz = case.meta.origin
    assert len(slices) == nz and len(list(folder.iterdir())) == nz + 1
    for k, ds in enumerate(slices):
        assert ds.SOPClassUID == CT_IMAGE_STORAGE and ds.Modality == "CT"
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], [ox, oy, oz + k * dz],
                           atol=1e-5)
        assert np.allclose([float(v) for v in ds.PixelSpacing], [dy, dx])
        assert float(ds.SliceThickness) == pytest.approx(dz)
        assert (ds.Rows, ds.Columns) == (ny, nx)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.array_equal(hu, case.image[k])
    assert len({ds.SeriesInstanceUID for ds in slices}) == 1
    assert len({ds.FrameOfReferenceUID for ds in slices}) == 1
    assert len({ds.SOPInstanceUID for ds in slices}) == nz


def test_rtstruct_references_and_masks(written: tuple[Case, Path]) -> None:
    case, folder = written
    slices = _slices(folder)
    rs = pydicom.dcmread(folder / "RS.dcm")
    assert rs.SOPClassUID == RTSTRUCT_STORAGE and rs.Modality == "RTSTRUCT"
    assert rs.StudyInstanceUID == slices[0].StudyInstanceUID
    frame = rs.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == slices[0].FrameOfReferenceUID
    series = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == slices[0].SeriesInstanceUID
    uid_to_k = {ds.SOPInstanceUID: k for k, ds in enumerate(slices)}
    _, ny, nx = case.image.shape
    dz, dy, dx = case.meta.spacing
    ox, oy, oz = case.meta.origin
    xs, ys = ox + dx * np.arange(nx), oy + dy * np.arange(ny)
    aliases = AliasTable()
    names = {roi.ROINumber: roi.ROIName for roi in rs.StructureSetROISequence}
    assert sorted(aliases.canonical(n) for n in names.values()) == sorted(ORGANS)
    for roi in rs.ROIContourSequence:
        organ = aliases.canonical(names[roi.ReferencedROINumber])
        polygons: dict[int, list[np.ndarray]] = {}
        for item in roi.ContourSequence:
            assert item.ContourGeometricType == "CLOSED_PLANAR"
            points = np.asarray(item.ContourData, dtype=float).reshape(-1, 3)
            assert len(points) == item.NumberOfContourPoints
            k = uid_to_k[item.ContourImageSequence[0].ReferencedSOPInstanceUID]
            assert np.allclose(points[:, 2], oz + k * dz, atol=1e-4)
            polygons.setdefault(k, []).append(points[:, :2])
        mask = np.zeros(case.image.shape, dtype=bool)
        for k, polys in polygons.items():
            mask[k] = _even_odd_fill(polys, xs, ys)
        assert _dice(mask, case.masks[organ]) > 0.98
        assert np.array_equal(mask, case.masks[organ]), organ


@pytest.mark.parametrize("style", sorted(ROI_NAMES))
def test_roi_names_map_to_canonical_organs(style: str) -> None:
    aliases = AliasTable()
    assert {aliases.canonical(name): organ for organ, name in ROI_NAMES[style].items()} == {
        organ: organ for organ in ORGANS}


def test_same_seed_same_bytes_other_seed_other_uids(written: tuple[Case, Path],
                                                     tmp_path: Path) -> None:
    case, folder = written
    write_case_dicom(case, tmp_path / "again", uid_seed="12/clinic-1", roi_style="upper")
    for path in folder.iterdir():
        assert path.read_bytes() == (tmp_path / "again" / path.name).read_bytes(), path.name
    write_case_dicom(case, tmp_path / "other", uid_seed="13/clinic-1", roi_style="upper")
    a = pydicom.dcmread(folder / "CT.0001.dcm", stop_before_pixels=True)
    b = pydicom.dcmread(tmp_path / "other" / "CT.0001.dcm", stop_before_pixels=True)
    assert a.SeriesInstanceUID != b.SeriesInstanceUID
    assert a.FrameOfReferenceUID != b.FrameOfReferenceUID


def test_partial_labels_only_labelled_rois(tmp_path: Path) -> None:
    spec = ph.preset_spec("iid", 1, 1, 16, seed=1)
    spec = ph.with_clinic_knobs(spec, labelled_organs=[("body", "heart")])
    case = ph.make_case(spec, 0, 0)
    write_case_dicom(case, tmp_path / "p", uid_seed="x", roi_style="short")
    rs = pydicom.dcmread(tmp_path / "p" / "RS.dcm")
    assert [r.ROIName for r in rs.StructureSetROISequence] == ["Outline", "Heart"]
    assert [o.RTROIInterpretedType for o in rs.RTROIObservationsSequence] == ["EXTERNAL",
                                                                             "ORGAN"]


def test_empty_labelled_mask_gives_roi_without_contours(written: tuple[Case, Path],
                                                        tmp_path: Path) -> None:
    case, _ = written
    masks = dict(case.masks)
    masks["heart"] = np.zeros_like(masks["heart"])
    write_case_dicom(dataclasses.replace(case, masks=masks), tmp_path / "e", uid_seed="e")
    rs = pydicom.dcmread(tmp_path / "e" / "RS.dcm")
    number = next(r.ROINumber for r in rs.StructureSetROISequence if r.ROIName == "Heart")
    roi = next(r for r in rs.ROIContourSequence if r.ReferencedROINumber == number)
    assert "ContourSequence" not in roi


def test_rejects_oblique_and_existing_folder(written: tuple[Case, Path],
                                             tmp_path: Path) -> None:
    case, folder = written
    oblique = dataclasses.replace(case, meta=dataclasses.replace(
        case.meta, direction=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)))
    with pytest.raises(FedsegError, match="identity direction"):
        write_case_dicom(oblique, tmp_path / "o", uid_seed="x")
    assert not (tmp_path / "o").exists()
    with pytest.raises(FedsegError, match="already exists"):
        write_case_dicom(case, folder, uid_seed="x")


# ----------------------------------------------------------------------------- CLI + importer


@pytest.fixture(scope="module")
def benchmark_dicom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "bench"
    result = CliRunner().invoke(cli, [
        "data", "phantoms", "--clinics", "2", "--patients", "2", "--size", "32", "--out",
        str(out), "--seed", "5", "--preset", "non-iid", "--dicom"])
    assert result.exit_code == 0, result.output
    return out


def test_cli_dicom_layout(benchmark_dicom: Path) -> None:
    for clinic in ("clinic-1", "clinic-2"):
        manifest = read_manifest(benchmark_dicom / clinic)
        patients = sorted(p.name for p in (benchmark_dicom / "dicom" / clinic).iterdir())
        assert patients == sorted(e.case_id for e in manifest.cases)
        for patient in patients:
            assert (benchmark_dicom / "dicom" / clinic / patient / "RS.dcm").is_file()


def test_importer_round_trip(benchmark_dicom: Path, tmp_path: Path) -> None:
    importer = pytest.importorskip("fedseg_clinic.imaging.importer")
    for clinic in ("clinic-1", "clinic-2"):
        options = importer.ImportOptions(clinic=clinic, crop=False, hu_clip=ph.HU_CLIP)
        report = importer.import_clinic(benchmark_dicom / "dicom" / clinic, tmp_path / clinic,
                                        options)
        assert not report.failed, report.problems
        originals = {}
        for folder in (benchmark_dicom / "dicom" / clinic).iterdir():
            ds = pydicom.dcmread(folder / "CT.0001.dcm", stop_before_pixels=True)
            originals[ds.SeriesInstanceUID] = read_case(benchmark_dicom / clinic / folder.name)
        imported = read_manifest(tmp_path / clinic).cases
        assert len(imported) == len(originals)
        for entry in imported:
            case = read_case(tmp_path / clinic / entry.case_id)
            original = originals[case.meta.source_series_uid]
            assert np.array_equal(case.image, original.image)
            assert np.allclose(case.meta.origin, original.meta.origin, atol=1e-4)
            assert set(case.masks) == set(original.masks)
            for organ, mask in original.masks.items():
                assert _dice(case.masks[organ], mask) > 0.98, (clinic, organ)
