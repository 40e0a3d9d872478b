"""The per-patient import driver, preprocessing, inspection and `fedseg data import|inspect`."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.uid import generate_uid

from fedseg.cli import cli
from fedseg_clinic.cases import read_case, read_manifest
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.imaging import preprocess
from fedseg_clinic.imaging.importer import ImportOptions, import_clinic
from fedseg_clinic.imaging.inspection import ClinicStats, inspect_path
from fedseg_clinic.imaging.series import Geometry
from fedseg_clinic.organs import AliasTable

MOCK = Path("rt-utils/tests/mock_data")
CT3 = Path("dcmqi/data/segmentations/ct-3slice")
SEGS = Path("dcmqi/data/segmentations")
ALIASES = AliasTable({"heart": ["ROI-1"]})


def _copy_mock(shared_data: Path, dst: Path, rt: str = "rt.dcm") -> Path:
    dst.mkdir(parents=True)
    for name in ("ct_1.dcm", "ct_2.dcm", rt):
        shutil.copy(shared_data / MOCK / name, dst / name)
    return dst


def _copy_ct3(shared_data: Path, dst: Path, new_series: bool = False) -> Path:
    dst.mkdir(parents=True)
    series_uid = generate_uid()
    for name in ("01.dcm", "02.dcm", "03.dcm"):
        ds = pydicom.dcmread(shared_data / CT3 / name)
        if new_series:
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(dst / name)
    return dst


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner(mix_stderr=False).invoke(cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.stdout, result.stderr


def _leftovers(out: Path) -> list[str]:
    """Hidden temporary folders a crashed write would leave behind."""
    return [p.name for p in out.iterdir() if p.name.startswith(".") and p.is_dir()]


# --- preprocessing --------------------------------------------------------------------


def test_threshold_body_mask_fills_lungs() -> None:
    hu = np.full((3, 20, 20), -1000.0, dtype=np.float32)
    hu[:, 4:16, 4:16] = 40.0  # body
    hu[:, 7:13, 7:13] = -850.0  # lung, enclosed in every slice
    hu[:, 0:2, 0:2] = 200.0  # a small table-like blob, not connected
    body = preprocess.threshold_body_mask(hu)
    assert int(body.sum()) == 3 * 12 * 12
    assert not body[:, 0:2, 0:2].any()


def test_threshold_body_mask_empty() -> None:
    assert not preprocess.threshold_body_mask(np.full((2, 4, 4), -1000.0)).any()


def test_crop_box_and_geometry() -> None:
    mask = np.zeros((5, 10, 12), dtype=bool)
    mask[2, 3:5, 4:9] = True
    box = preprocess.crop_box(mask, margin=1)
    assert box == (slice(1, 4), slice(2, 6), slice(3, 10))
    g = Geometry(shape=(5, 10, 12), spacing=(2.0, 1.0, 0.5), origin=(10.0, 20.0, 30.0),
                 direction=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
    cropped = preprocess.crop_geometry(g, box)
    assert cropped.shape == (3, 4, 7)
    assert cropped.origin == pytest.approx((10.0 + 3 * 0.5, 20.0 + 2 * 1.0, 30.0 + 1 * 2.0))
    with pytest.raises(FedsegError, match="body mask is empty"):
        preprocess.crop_box(np.zeros((2, 2, 2), dtype=bool))


def test_resample_halves_voxels() -> None:
    g = Geometry(shape=(4, 8, 8), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                 direction=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
    hu = np.zeros((4, 8, 8), dtype=np.float32)
    hu[:, :, 4:] = 100.0
    mask = np.zeros((4, 8, 8), dtype=bool)
    mask[:, 2:6, 2:6] = True
    new_hu, new_masks, new_g = preprocess.resample(hu, {"heart": mask}, g, (2.0, 2.0, 2.0))
    assert new_g.shape == (2, 4, 4) and new_g.spacing == (2.0, 2.0, 2.0)
    assert new_g.origin == g.origin
    assert new_hu[0, 0].tolist() == [0.0, 0.0, 100.0, 100.0]
    # Same physical volume, to within a voxel layer: 2*4*4*1 mm^3 * 8 = 64 voxels of 1 mm^3.
    assert int(new_masks["heart"].sum()) * 8 == pytest.approx(int(mask.sum()), rel=0.5)
    same = preprocess.resample(hu, {"heart": mask}, g, (1.0, 1.0, 1.0))
    assert same[0] is hu


@pytest.mark.parametrize("low, high, expected", [(-1024, 3071, [-1024, 0, 3071]),
                                                 (-100, 100, [-100, 0, 100])])
def test_clip_hu(low: float, high: float, expected: list[int]) -> None:
    clipped = preprocess.clip_hu(np.array([-3024.0, 0.4, 5000.0]), low, high)
    assert clipped.dtype == np.int16 and clipped.tolist() == expected


def test_clip_hu_bad_window() -> None:
    with pytest.raises(FedsegError, match="low < high"):
        preprocess.clip_hu(np.zeros(3), 10, -10)


# --- import driver --------------------------------------------------------------------


def test_import_mock_rtstruct(shared_data: Path, tmp_path: Path) -> None:
    src = _copy_mock(shared_data, tmp_path / "src" / "patient")
    out = tmp_path / "out"
    report = import_clinic(src.parent, out, ImportOptions(clinic="c1", aliases=ALIASES,
                                                          crop=False))
    assert report.ok and len(report.cases) == 1 and report.slices == 2
    case = read_case(out / report.cases[0])
    assert case.meta.labelled_organs == ("heart",)
    assert int(case.masks["heart"].sum()) == pytest.approx(1443, rel=0.02)
    assert case.image.dtype == np.int16 and int(case.image.min()) == -1024
    assert case.meta.case_id.startswith("case-") and case.meta.spacing[0] == 5.0
    assert case.meta.extra["roi_organs"] == {"ROI-1": "heart"}
    # Pseudonyms only: the PatientID appears in no written file.
    for path in out.rglob("*.json"):
        assert "PHANTOM_EXAMPLE" not in path.read_text()
    manifest = read_manifest(out)
    assert manifest.clinic == "c1" and [c.case_id for c in manifest.cases] == report.cases


def test_crop_keeps_roi_and_moves_origin(shared_data: Path, tmp_path: Path) -> None:
    src = _copy_mock(shared_data, tmp_path / "src")
    out = tmp_path / "out"
    report = import_clinic(src, out, ImportOptions(aliases=ALIASES))
    case = read_case(out / report.cases[0])
    assert case.meta.shape[1] < 512 and case.meta.shape[2] < 512
    assert int(case.masks["heart"].sum()) == pytest.approx(1443, rel=0.02)
    assert case.meta.extra["crop_body_from"] == "threshold"
    # The first labelled voxel keeps its patient position after cropping.
    assert case.meta.origin[0] > -125.0 and case.meta.origin[2] == pytest.approx(60.0)


def test_import_stable_ids_and_resampling(shared_data: Path, tmp_path: Path) -> None:
    src = _copy_mock(shared_data, tmp_path / "src")
    out = tmp_path / "out"
    first = import_clinic(src, out, ImportOptions(aliases=ALIASES, crop=False))
    second = import_clinic(src, out, ImportOptions(aliases=ALIASES, crop=False,
                                                   spacing=(5.0, 1.0, 1.0)))
    assert first.cases == second.cases
    case = read_case(out / second.cases[0])
    assert case.meta.shape == (2, 250, 250) and case.meta.spacing == (5.0, 1.0, 1.0)
    # 0.488 -> 1.0 mm in-plane: the voxel count scales by about 0.24.
    assert int(case.masks["heart"].sum()) == pytest.approx(1443 * 0.488281**2, rel=0.1)
    other_salt = import_clinic(src, tmp_path / "out2", ImportOptions(aliases=ALIASES))
    assert other_salt.cases != first.cases


def test_organ_lost_by_resampling_is_unlabelled(shared_data: Path, tmp_path: Path) -> None:
    src = _copy_mock(shared_data, tmp_path / "src")
    report = import_clinic(src, tmp_path / "out", ImportOptions(aliases=ALIASES, crop=False,
                                                                spacing=(5.0, 60.0, 60.0)))
    assert report.ok and any("heart is empty after" in p.text for p in report.problems)
    case = read_case(tmp_path / "out" / report.cases[0])
    assert case.meta.shape == (2, 4, 4) and case.meta.labelled_organs == ()


def test_import_labelmaps(shared_data: Path, tmp_path: Path) -> None:
    src = _copy_ct3(shared_data, tmp_path / "src" / "p")
    for name in ("heart_seg.nrrd", "liver_seg.nrrd"):
        shutil.copy(shared_data / SEGS / name, src.parent / name)
    out = tmp_path / "out"
    report = import_clinic(src.parent, out, ImportOptions(crop=False))
    assert report.ok, [p.line() for p in report.problems]
    case = read_case(out / report.cases[0])
    assert case.meta.labelled_organs == ("heart",)
    assert int(case.masks["heart"].sum()) == 41449
    assert case.meta.unmapped_rois == ("liver",)
    assert any("'liver' maps to no organ" in p.text for p in report.problems)


def test_labelmap_placement(shared_data: Path, tmp_path: Path) -> None:
    """A label map above two series goes to the one it overlaps; an orphan is an error."""
    src = tmp_path / "src"
    _copy_mock(shared_data, src / "a")
    _copy_ct3(shared_data, src / "b")
    shutil.copy(shared_data / SEGS / "heart_seg.nrrd", src / "heart_seg.nrrd")
    (src / "c").mkdir()
    shutil.copy(shared_data / SEGS / "spine_seg.nrrd", src / "c" / "spine_seg.nrrd")
    (src / "c" / "notes.nrrd").write_bytes(b"ignored: no seg/label in the name")
    report = import_clinic(src, tmp_path / "out", ImportOptions(crop=False, aliases=ALIASES))
    assert len(report.cases) == 2
    organs = sorted(read_case(tmp_path / "out" / c).meta.labelled_organs for c in report.cases)
    assert organs == [("heart",), ("heart",)]  # ROI-1 -> heart in a, the NRRD heart in b
    errors = [p.text for p in report.problems if p.severity == "error"]
    assert len(errors) == 1 and "spine_seg.nrrd: label map matches no CT series" in errors[0]
    assert any("notes.nrrd: skipped" in p.text for p in report.problems)


def test_import_dicom_seg(shared_data: Path, tmp_path: Path) -> None:
    src = _copy_ct3(shared_data, tmp_path / "src")
    shutil.copy(shared_data / SEGS / "liver.dcm", src / "seg.dcm")
    # No liver among the canonical organs: map it onto one just for this test.
    options = ImportOptions(crop=False, aliases=AliasTable({"heart": ["Liver"]}))
    report = import_clinic(src, tmp_path / "out", options)
    assert report.ok, [p.line() for p in report.problems]
    case = read_case(tmp_path / "out" / report.cases[0])
    assert int(case.masks["heart"].sum()) == 107098
    assert case.meta.extra["label_sources"] == {"rtstruct": 0, "seg": 1, "labelmap": 0}


def test_dicom_seg_for_another_series(shared_data: Path, tmp_path: Path) -> None:
    src = _copy_mock(shared_data, tmp_path / "src")
    shutil.copy(shared_data / SEGS / "liver.dcm", src / "seg.dcm")
    report = import_clinic(src, tmp_path / "out", ImportOptions(aliases=ALIASES))
    assert not report.ok and len(report.cases) == 1
    assert any("seg.dcm: SEG points at CT series" in p.text for p in report.problems)


def test_oblique_series_keeps_orientation(shared_data: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(shared_data / "rt-utils/tests/oriented_data", src)
    report = import_clinic(src, tmp_path / "out", ImportOptions(crop=False))
    assert report.ok and len(report.cases) == 1
    assert any("info.txt: skipped" in p.text for p in report.problems)
    meta = read_case(tmp_path / "out" / report.cases[0]).meta
    direction = np.asarray(meta.direction).reshape(3, 3)
    first = pydicom.dcmread(src / "0.dcm")
    assert direction[:, 0] == pytest.approx([float(v) for v in first.ImageOrientationPatient[:3]])
    assert direction[:, 1] == pytest.approx([float(v) for v in first.ImageOrientationPatient[3:]])
    assert meta.origin == pytest.approx([float(v) for v in first.ImagePositionPatient])
    assert meta.shape == (3, 50, 100)


def test_output_inside_source_is_not_rescanned(shared_data: Path, tmp_path: Path) -> None:
    src = _copy_mock(shared_data, tmp_path / "src")
    out = src / "cases"
    import_clinic(src, out, ImportOptions(aliases=ALIASES))
    again = import_clinic(src, out, ImportOptions(aliases=ALIASES))
    assert again.ok and again.problems == []


def test_malformed_rtstruct_is_one_error(shared_data: Path, tmp_path: Path) -> None:
    src = _copy_mock(shared_data, tmp_path / "src")
    ds = pydicom.dcmread(src / "rt.dcm")
    del ds.StructureSetROISequence[0].ROINumber
    ds.save_as(src / "rt.dcm")
    code, stdout, stderr = _run("data", "import", str(src), "--out", str(tmp_path / "out"))
    assert code == 1 and "Traceback" not in stderr
    assert "rt.dcm: malformed RTSTRUCT" in stderr
    # Not imported without its labels.
    assert "imported 0 case(s)" in stdout and "1 patient(s) failed" in stdout


def test_no_ct_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("hello")
    with pytest.raises(FedsegError, match="no CT series found"):
        import_clinic(tmp_path / "src", tmp_path / "out", ImportOptions())


# --- CLI: bad input -------------------------------------------------------------------


@pytest.fixture()
def messy_clinic(shared_data: Path, tmp_path: Path) -> Path:
    """One good patient, one with a missing slice, one with a broken RTSTRUCT, and junk."""
    src = tmp_path / "src"
    _copy_mock(shared_data, src / "good")
    gapped = _copy_ct3(shared_data, src / "gapped")
    ds = pydicom.dcmread(gapped / "01.dcm")
    ds.SOPInstanceUID = generate_uid()
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], -124.69]
    ds.save_as(gapped / "04.dcm")
    (src / "good" / "report.pdf").write_bytes(b"%PDF-1.4 junk")
    (src / "good" / "truncated.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00")
    return src


def test_cli_messy_clinic(messy_clinic: Path, tmp_path: Path) -> None:
    aliases = tmp_path / "aliases.json"
    aliases.write_text(json.dumps({"heart": ["ROI-1"]}))
    out = tmp_path / "out"
    code, stdout, stderr = _run("data", "import", str(messy_clinic), "--out", str(out),
                                "--clinic", "messy", "--aliases", str(aliases))
    assert code == 1
    lines = stderr.strip().splitlines()
    assert any("report.pdf: skipped" in line for line in lines)
    assert any("truncated.dcm: skipped" in line for line in lines)
    assert any(line.startswith("error:") and "04.dcm" in line and "missing slice" in line
               for line in lines)
    assert "Traceback" not in stderr
    assert "imported 1 case(s)" in stdout
    manifest = read_manifest(out)
    assert len(manifest.cases) == 1 and manifest.cases[0].labelled_organs == ("heart",)
    assert _leftovers(out) == []
    assert len([p for p in out.iterdir() if p.is_dir()]) == 1


@pytest.mark.parametrize("name", ["invalid_reference_rt.dcm", "non_existent_reference_rt.dcm"])
def test_cli_broken_rtstruct_reference(shared_data: Path, tmp_path: Path, name: str) -> None:
    src = _copy_mock(shared_data, tmp_path / "src", rt=name)
    code, stdout, stderr = _run("data", "import", str(src), "--out", str(tmp_path / "out"))
    assert code == 1
    assert f"{name}: RTSTRUCT references" in stderr and "not in CT series" in stderr
    assert "imported 0 case(s)" in stdout and "1 patient(s) failed" in stdout
    assert not any(p.is_dir() for p in (tmp_path / "out").iterdir())


def test_cli_rtstruct_for_another_series(shared_data: Path, tmp_path: Path) -> None:
    src = _copy_ct3(shared_data, tmp_path / "src")
    shutil.copy(shared_data / MOCK / "rt.dcm", src / "rt.dcm")
    code, stdout, stderr = _run("data", "import", str(src), "--out", str(tmp_path / "out"))
    assert code == 1
    assert "rt.dcm: RTSTRUCT points at CT series" in stderr and "not in" in stderr
    assert "imported 1 case(s)" in stdout  # the CT itself is still imported


def test_cli_two_series_one_patient(shared_data: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _copy_ct3(shared_data, src / "a")
    _copy_ct3(shared_data, src / "b", new_series=True)
    code, _, stderr = _run("data", "import", str(src), "--out", str(tmp_path / "out"))
    assert code == 1
    assert "2 CT series for one patient study" in stderr and "--series" in stderr
    pick = pydicom.dcmread(src / "b" / "01.dcm").SeriesInstanceUID
    code, _stdout, stderr = _run("data", "import", str(src), "--out", str(tmp_path / "out"),
                                "--series", str(pick))
    assert code == 0, stderr
    case_dir = next(p for p in (tmp_path / "out").iterdir() if p.is_dir() and
                    not p.name.startswith("."))
    assert read_case(case_dir).meta.source_series_uid == pick


@pytest.mark.parametrize("problem", ["outside", "empty"])
def test_cli_roi_problems_are_warnings(shared_data: Path, tmp_path: Path, problem: str) -> None:
    src = _copy_mock(shared_data, tmp_path / "src")
    ds = pydicom.dcmread(src / "rt.dcm")
    roi_contour = ds.ROIContourSequence[0]
    if problem == "outside":
        for contour in roi_contour.ContourSequence:
            points = [float(v) for v in contour.ContourData]
            points[2::3] = [500.0] * (len(points) // 3)
            contour.ContourData = [f"{v:g}" for v in points]
    else:
        del roi_contour.ContourSequence
    ds.save_as(src / "rt.dcm")
    aliases = tmp_path / "aliases.yaml"
    aliases.write_text("heart: [ROI-1]\n")
    code, _stdout, stderr = _run("data", "import", str(src), "--out", str(tmp_path / "out"),
                                "--aliases", str(aliases))
    assert code == 0, stderr
    assert "rt.dcm" in stderr and "'ROI-1' (heart) is empty" in stderr
    if problem == "outside":
        assert "outside the CT volume" in stderr
    case_dir = tmp_path / "out" / read_manifest(tmp_path / "out").cases[0].case_id
    assert read_case(case_dir).meta.labelled_organs == ()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hu-clip", "100", "-100"], "HU clip window"),
        (["--val-fraction", "1.5"], "val fraction"),
        (["--spacing", "0", "1", "1"], "spacing must be"),
    ],
)
def test_cli_bad_options(shared_data: Path, tmp_path: Path, args: list[str],
                         message: str) -> None:
    src = _copy_mock(shared_data, tmp_path / "src")
    code, _, stderr = _run("data", "import", str(src), "--out", str(tmp_path / "out"), *args)
    assert code == 1 and message in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_cli_bad_alias_file_and_no_ct(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "aliases.json").write_text("{not json")
    code, _, stderr = _run("data", "import", str(tmp_path / "src"), "--out",
                           str(tmp_path / "out"), "--aliases", str(tmp_path / "aliases.json"))
    assert code == 1 and "aliases.json: not a valid alias table" in stderr
    code, _, stderr = _run("data", "import", str(tmp_path / "src"), "--out",
                           str(tmp_path / "out"))
    assert code == 1 and "no CT series found" in stderr
    assert len(stderr.strip().splitlines()) == 1


# --- inspect --------------------------------------------------------------------------


def test_inspect_case_and_clinic(shared_data: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _copy_mock(shared_data, src / "a")
    _copy_ct3(shared_data, src / "b")
    out = tmp_path / "out"
    report = import_clinic(src, out, ImportOptions(aliases=ALIASES, crop=False,
                                                   val_fraction=0.5))
    assert len(report.cases) == 2
    stats = inspect_path(out)
    assert isinstance(stats, ClinicStats)
    assert stats.n_train == 1 and stats.n_val == 1
    assert stats.organ_cases == {"heart": 1}
    heart_cc = stats.organ_volume_cc["heart"]
    voxels = sum(c.organs["heart"].voxels for c in stats.cases if "heart" in c.organs)
    assert heart_cc == pytest.approx(voxels * 5.0 * 0.488281**2 / 1000.0)
    code, stdout, _ = _run("data", "inspect", str(out), "--json")
    data = json.loads(stdout)
    assert data["total_voxels"] == 2 * 512 * 512 + 3 * 512 * 512
    code, stdout, _ = _run("data", "inspect", str(out / report.cases[0]))
    assert code == 0 and "shape" in stdout and "spacing" in stdout
    code, _, stderr = _run("data", "inspect", str(tmp_path))
    assert code == 1 and "neither a case folder" in stderr


# --- CLI: non-finite and degenerate values are refused in one line -------------------


def _set_contour_value(path: Path, value: str) -> None:
    ds = pydicom.dcmread(path)
    contour = ds.ROIContourSequence[0].ContourSequence[0]
    points = [str(v) for v in contour.ContourData]
    points[4] = value  # y of the second point
    contour.ContourData = points
    ds.save_as(path)


def _set_ct(paths: list[Path], **values: object) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        for keyword, value in values.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("contour-nan", "rt.dcm: ROI 'ROI-1' has ContourData value nan at point 2"),
        ("contour-inf", "rt.dcm: ROI 'ROI-1' has ContourData value -inf at point 2"),
        ("spacing-zero", "ct_1.dcm: PixelSpacing must be two positive numbers, got [0, 0]"),
        ("intercept-nan", "ct_2.dcm: RescaleIntercept is 'NaN', not a finite number"),
        ("slope-inf", "ct_2.dcm: RescaleSlope is 'inf', not a finite number"),
    ],
)
def test_cli_non_finite_values_refused(shared_data: Path, tmp_path: Path, case: str,
                                       expected: str) -> None:
    src = _copy_mock(shared_data, tmp_path / "src")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns when writing 'NaN' into a DS
        if case == "contour-nan":
            _set_contour_value(src / "rt.dcm", "NaN")
        elif case == "contour-inf":
            _set_contour_value(src / "rt.dcm", "-inf")
        elif case == "spacing-zero":
            _set_ct([src / "ct_1.dcm", src / "ct_2.dcm"], PixelSpacing=["0", "0"])
        elif case == "intercept-nan":
            _set_ct([src / "ct_2.dcm"], RescaleIntercept="NaN")
        else:
            _set_ct([src / "ct_2.dcm"], RescaleSlope="inf")
    out = tmp_path / "out"
    code, stdout, stderr = _run("data", "import", str(src), "--out", str(out))
    assert code == 1 and "Traceback" not in stderr and "Warning" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert any(expected in line for line in errors), stderr
    # The patient is refused, never imported with the bad value.
    assert "imported 0 case(s)" in stdout and "1 patient(s) failed" in stdout
    assert not any(p.is_dir() and not p.name.startswith(".") for p in out.iterdir())


def test_cli_rejected_ct_reason_is_shown(shared_data: Path, tmp_path: Path) -> None:
    src = _copy_mock(shared_data, tmp_path / "src")
    _set_ct([src / "ct_1.dcm", src / "ct_2.dcm"], SeriesInstanceUID=None)
    code, _, stderr = _run("data", "import", str(src), "--out", str(tmp_path / "out"))
    assert code == 1 and "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "no CT series found" in lines[0] and "unreadable" not in lines[0]
    assert "2 CT file without SeriesInstanceUID: " in lines[0]
    assert str(src / "ct_1.dcm") in lines[0]
    # With one good series left, the rejected file is a warning naming its reason.
    ds = pydicom.dcmread(src / "ct_2.dcm")
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(src / "ct_2.dcm")
    code, _, stderr = _run("data", "import", str(src), "--out", str(tmp_path / "out"))
    assert f"{src / 'ct_1.dcm'}: skipped: CT file without SeriesInstanceUID" in stderr


def test_cli_import_writes_owner_only(shared_data: Path, tmp_path: Path) -> None:
    """Imported CT data and the pseudonym salt: files 0600, folders 0700."""
    import os
    import stat

    src = _copy_mock(shared_data, tmp_path / "src")
    out = tmp_path / "out"
    old = os.umask(0o000)  # even a permissive umask gives nothing to others
    try:
        code, _, stderr = _run("data", "import", str(src), "--out", str(out))
    finally:
        os.umask(old)
    assert code == 0, stderr
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode)
             for p in [out, *out.rglob("*")]}
    assert modes["."] == 0o700 and modes[".pseudonym-salt"] == 0o600
    assert modes["manifest.json"] == 0o600
    assert len(modes) == 7  # folder, salt, manifest, one case folder with 3 files
    for name, mode in modes.items():
        assert mode == (0o700 if (out / name).is_dir() else 0o600), (name, oct(mode))


@pytest.mark.parametrize("source", ["nrrd-origin-nan", "seg-spacing-inf"])
def test_cli_non_finite_label_geometry_refused(shared_data: Path, tmp_path: Path,
                                               source: str) -> None:
    src = _copy_ct3(shared_data, tmp_path / "src")
    if source == "nrrd-origin-nan":
        import nrrd

        data, header = nrrd.read(str(shared_data / SEGS / "heart_seg.nrrd"))
        header["space origin"] = np.array([np.nan, -226.8, -128.69])
        nrrd.write(str(src / "heart_seg.nrrd"), data, header)
        expected = "heart_seg.nrrd: non-finite value in the voxel-to-patient matrix"
    else:
        ds = pydicom.dcmread(shared_data / SEGS / "liver.dcm")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns when writing 'inf' into a DS
            ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [
                "inf", "0.810547"]
        ds.save_as(src / "seg.dcm")
        expected = "seg.dcm: frame 1: PixelSpacing [inf, 0.810547]"
    code, stdout, stderr = _run("data", "import", str(src), "--out", str(tmp_path / "out"))
    assert code == 1 and "Traceback" not in stderr and "Warning" not in stderr
    assert any(line.startswith("error:") and expected in line
               for line in stderr.splitlines()), stderr
    assert "imported 0 case(s)" in stdout
