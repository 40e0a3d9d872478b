"""NIfTI/NRRD CT import: geometry, masks and label maps, alias mapping, errors, OpenKBP."""

from __future__ import annotations

from pathlib import Path

import nibabel
import nrrd
import numpy as np
import pytest
from click.testing import CliRunner

from fedseg.cli import cli
from fedseg_clinic.cases import read_case, read_manifest
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.imaging.importer import ImportOptions
from fedseg_clinic.imaging.series import Geometry
from fedseg_clinic.imaging.volumes import (
    canonical_grid,
    find_volume_cases,
    import_volume_clinic,
)

# OpenKBP's affine: i anterior->posterior, j right->left, k superior->inferior (RAS form).
KBP_SPACING = (3.9, 3.5, 2.5)  # (i, j, k) mm
KBP_AFFINE = np.array([[0.0, -KBP_SPACING[1], 0.0, 0.0],
                       [-KBP_SPACING[0], 0.0, 0.0, 0.0],
                       [0.0, 0.0, -KBP_SPACING[2], 0.0],
                       [0.0, 0.0, 0.0, 1.0]])


def _geometry(meta: object) -> Geometry:
    d = meta.direction  # type: ignore[attr-defined]
    return Geometry(shape=meta.shape, spacing=meta.spacing,  # type: ignore[attr-defined]
                    origin=meta.origin,  # type: ignore[attr-defined]
                    direction=tuple(tuple(d[i * 3:i * 3 + 3]) for i in range(3)))


def _phantom(shape: tuple[int, int, int] = (24, 20, 16)
             ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A body block in (i, j, k) file order with two 'parotids' and a 'cord'."""
    ct = np.full(shape, -1000, np.int16)
    ct[3:-3, 3:-3, 2:-2] = 40
    masks = {name: np.zeros(shape, np.uint8) for name in ("LeftParotid", "RightParotid",
                                                          "SpinalCord")}
    masks["LeftParotid"][8:11, 13:16, 4:7] = 1     # larger j = patient left
    masks["RightParotid"][8:11, 4:7, 4:7] = 1
    masks["SpinalCord"][17:19, 9:11, 3:13] = 1     # posterior (large i), long in k
    return ct, masks


def _write_kbp_case(folder: Path, ct: np.ndarray, masks: dict[str, np.ndarray]) -> None:
    (folder / "segmentations").mkdir(parents=True)
    nibabel.save(nibabel.Nifti1Image(ct, KBP_AFFINE), folder / "ct.nii.gz")
    for name, mask in masks.items():
        nibabel.save(nibabel.Nifti1Image(mask, KBP_AFFINE),
                     folder / "segmentations" / f"{name}.nii.gz")


def test_canonical_grid_is_a_permutation_with_the_same_patient_points() -> None:
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ KBP_AFFINE
    array, geometry, axes = canonical_grid(data, lps, Path("x.nii"))
    assert axes == ["k-", "i+", "j+"]
    assert np.allclose(geometry.direction, np.eye(3))
    assert geometry.spacing == pytest.approx((2.5, 3.9, 3.5))
    # Every voxel keeps its value and its patient position.
    for ijk in [(0, 0, 0), (3, 4, 5), (1, 2, 3)]:
        point = lps[:3, :3] @ np.array(ijk, float) + lps[:3, 3]
        zyx = np.rint(geometry.lps_to_index(point[None])[0]).astype(int)
        assert array[tuple(zyx)] == data[ijk]


def test_sheared_or_degenerate_grid_is_refused() -> None:
    shear = np.eye(4)
    shear[0, 1] = 0.5
    with pytest.raises(FedsegError, match="not orthogonal"):
        canonical_grid(np.zeros((2, 2, 2)), shear, Path("s.nii"))
    flat = np.diag([1.0, 0.0, 1.0, 1.0])
    with pytest.raises(FedsegError, match="zero or invalid spacing"):
        canonical_grid(np.zeros((2, 2, 2)), flat, Path("f.nii"))


def test_openkbp_layout_imports_with_anatomy_in_place(tmp_path: Path) -> None:
    ct, masks = _phantom()
    _write_kbp_case(tmp_path / "src" / "pt_7", ct, masks)
    report = import_volume_clinic(tmp_path / "src", tmp_path / "out",
                                  ImportOptions(organ_set="head_neck", crop=False))
    assert report.ok, [p.line() for p in report.problems]
    case = read_case(tmp_path / "out" / report.cases[0])
    assert case.meta.labelled_organs == ("parotid_left", "parotid_right", "spinal_cord")
    assert case.meta.source == "nifti"
    assert case.meta.extra["roi_organs"]["LeftParotid"] == "parotid_left"
    voxel_cc = float(np.prod(case.meta.spacing)) / 1000.0
    for name, organ in (("LeftParotid", "parotid_left"), ("SpinalCord", "spinal_cord")):
        assert case.masks[organ].sum() == masks[name].sum()  # no voxel lost or gained
        assert case.masks[organ].sum() * voxel_cc == pytest.approx(
            masks[name].sum() * np.prod(KBP_SPACING) / 1000.0)
    geometry = _geometry(case.meta)

    def centre(organ: str) -> np.ndarray:
        return geometry.index_to_lps(np.argwhere(case.masks[organ]).mean(0)[None])[0]

    assert centre("parotid_left")[0] > centre("parotid_right")[0]  # LPS x: patient left
    assert centre("spinal_cord")[1] > centre("parotid_left")[1]     # LPS y: posterior
    assert case.image.max() == 40 and case.image.min() == -1000
    manifest = read_manifest(tmp_path / "out")
    assert manifest.extra["organ_set"]["name"] == "head_neck"


def test_nrrd_ct_with_label_map_and_resampled_mask(tmp_path: Path) -> None:
    ct, masks = _phantom()
    folder = tmp_path / "p1"
    folder.mkdir()
    header = {"space": "left-posterior-superior",
              "space directions": np.diag([2.0, 2.0, 3.0]), "space origin": np.zeros(3)}
    nrrd.write(str(folder / "image.nrrd"), ct, header)
    labels = np.zeros(ct.shape, np.uint8)
    labels[masks["SpinalCord"] > 0] = 1
    labels[masks["LeftParotid"] > 0] = 2
    lheader = dict(header, Segment0_Name="Spinal Cord", Segment0_LabelValue="1",
                   Segment1_Name="Parotid_L", Segment1_LabelValue="2")
    nrrd.write(str(folder / "seg.nrrd"), labels, lheader)
    report = import_volume_clinic(folder, tmp_path / "out",
                                  ImportOptions(organ_set="head_neck", crop=False))
    assert report.ok, [p.line() for p in report.problems]
    case = read_case(tmp_path / "out" / report.cases[0])
    assert case.meta.source == "nrrd"
    assert case.masks["spinal_cord"].sum() == masks["SpinalCord"].sum()
    assert case.masks["parotid_left"].sum() == masks["LeftParotid"].sum()
    assert case.meta.spacing == pytest.approx((3.0, 2.0, 2.0))


def test_thorax_set_leaves_head_neck_structures_out_with_a_warning(tmp_path: Path) -> None:
    ct, masks = _phantom()
    _write_kbp_case(tmp_path / "src" / "a", ct, masks)
    report = import_volume_clinic(tmp_path / "src", tmp_path / "out",
                                  ImportOptions(organ_set="thorax", crop=False))
    case = read_case(tmp_path / "out" / report.cases[0])
    assert case.meta.labelled_organs == ("spinal_cord",)
    assert any("'LeftParotid' (parotid_left) is not in organ set thorax" in p.text
               for p in report.problems)


@pytest.mark.parametrize("problem, expected", [
    ("garbage", "cannot read NIfTI"),
    ("2d", "CT must be 3-D"),
    ("nan", "NaN"),
    ("far-mask", "does not overlap"),
])
def test_bad_input_fails_that_case_with_one_line(tmp_path: Path, problem: str,
                                                 expected: str) -> None:
    ct, masks = _phantom()
    good, bad = tmp_path / "src" / "good", tmp_path / "src" / "bad"
    _write_kbp_case(good, ct, masks)
    _write_kbp_case(bad, ct, masks)
    if problem == "garbage":
        (bad / "ct.nii.gz").write_bytes(b"not a nifti file")
    elif problem == "2d":
        nibabel.save(nibabel.Nifti1Image(ct[:, :, 0], KBP_AFFINE), bad / "ct.nii.gz")
    elif problem == "nan":
        nibabel.save(nibabel.Nifti1Image(np.full(ct.shape, np.nan, np.float32), KBP_AFFINE),
                     bad / "ct.nii.gz")
    else:
        far = KBP_AFFINE.copy()
        far[:3, 3] = 5000.0
        nibabel.save(nibabel.Nifti1Image(masks["SpinalCord"], far),
                     bad / "segmentations" / "SpinalCord.nii.gz")
    report = import_volume_clinic(tmp_path / "src", tmp_path / "out",
                                  ImportOptions(organ_set="head_neck", crop=False))
    assert len(report.cases) == 1 and len(report.failed) == 1
    errors = [p.text for p in report.problems if p.severity == "error"]
    assert len(errors) == 1 and expected in errors[0] and "\n" not in errors[0]
    assert str(bad) in errors[0]
    # Only the good case is on disk and in the manifest (no half-written folder).
    written = [p.name for p in (tmp_path / "out").iterdir() if p.is_dir()]
    assert written == report.cases
    assert [c.case_id for c in read_manifest(tmp_path / "out").cases] == report.cases


def test_cli_imports_volume_folders_and_refuses_missing_src(tmp_path: Path) -> None:
    ct, masks = _phantom()
    _write_kbp_case(tmp_path / "src" / "pt_1", ct, masks)
    runner = CliRunner()
    result = runner.invoke(cli, ["data", "import", str(tmp_path / "src"), "--out",
                                 str(tmp_path / "out"), "--organ-set", "head_neck",
                                 "--no-crop"])
    assert result.exit_code == 0, result.output
    assert "imported 1 case(s)" in result.output
    # The same case folder imported alone (or by its CT file) keeps its pseudonym.
    ids = {p.name for p in (tmp_path / "out").iterdir() if p.is_dir()}
    for src in (tmp_path / "src" / "pt_1", tmp_path / "src" / "pt_1" / "ct.nii.gz"):
        result = runner.invoke(cli, ["data", "import", str(src), "--out",
                                     str(tmp_path / "out"), "--organ-set", "head_neck"])
        assert result.exit_code == 0, result.output
        assert {p.name for p in (tmp_path / "out").iterdir() if p.is_dir()} == ids
    result = runner.invoke(cli, ["data", "import", str(tmp_path / "nope"), "--out",
                                 str(tmp_path / "o2")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].endswith("does not exist")
    result = runner.invoke(cli, ["data", "import", str(tmp_path / "src"), "--out",
                                 str(tmp_path / "o3"), "--organ-set", "pelvis"])
    assert result.exit_code == 1 and "unknown organ set 'pelvis'" in result.output


def test_find_volume_cases_follows_symlinked_folders(tmp_path: Path) -> None:
    ct, masks = _phantom()
    _write_kbp_case(tmp_path / "data" / "pt_1", ct, masks)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "linked").symlink_to(tmp_path / "data" / "pt_1")
    found = find_volume_cases(tmp_path / "src")
    assert len(found) == 1 and len(found[0].masks) == 3


# -- the real OpenKBP patients (read-only, beside the checkout) ----------------------------

KBP_PATIENTS = ("pt_1", "pt_10", "pt_151")  # pt_151: cord below the threshold body


@pytest.fixture(scope="module")
def openkbp(shared_data: Path) -> Path:
    folder = shared_data / "open-kbp" / "train-pats"
    if not all((folder / p / "ct.nii.gz").is_file() for p in KBP_PATIENTS):
        pytest.skip(f"OpenKBP patients {', '.join(KBP_PATIENTS)} are absent from {folder}")
    return folder


@pytest.mark.slow
def test_openkbp_volumes_equal_mask_voxels_times_voxel_volume(openkbp: Path,
                                                              tmp_path: Path) -> None:
    names = {"SpinalCord": "spinal_cord", "Brainstem": "brainstem", "LeftParotid":
             "parotid_left", "RightParotid": "parotid_right", "Esophagus": "esophagus",
             "Larynx": "larynx", "Mandible": "mandible"}
    checked = 0
    for name in KBP_PATIENTS:
        folder = openkbp / name  # read in place, never copied into the repository
        out = tmp_path / name
        report = import_volume_clinic(folder, out, ImportOptions(organ_set="head_neck"))
        assert report.ok, [p.line() for p in report.problems]
        assert len(report.cases) == 1
        case = read_case(out / report.cases[0])
        for path in sorted((folder / "segmentations").iterdir()):
            image = nibabel.load(path)
            voxels = int(np.count_nonzero(np.asanyarray(image.dataobj)))
            expected_cc = voxels * float(np.prod(image.header.get_zooms()[:3])) / 1000.0
            organ = names[path.name.removesuffix(".nii.gz")]
            got_cc = case.masks[organ].sum() * float(np.prod(case.meta.spacing)) / 1000.0
            assert got_cc == pytest.approx(expected_cc, rel=1e-6), (name, organ)
            checked += 1
        geometry = _geometry(case.meta)

        def centre(organ: str, case: object = case, geometry: Geometry = geometry
                   ) -> np.ndarray:
            return geometry.index_to_lps(
                np.argwhere(case.masks[organ]).mean(0)[None])[0]  # type: ignore[attr-defined]

        if "brainstem" in case.masks:
            assert centre("brainstem")[2] > centre("spinal_cord")[2]  # superior
        if "parotid_left" in case.masks and "parotid_right" in case.masks:
            assert centre("parotid_left")[0] > centre("parotid_right")[0]  # LPS x: left
        assert read_manifest(out).extra["organ_set"]["name"] == "head_neck"
    assert checked >= 10


def test_mask_on_another_grid_is_resampled_with_a_warning(tmp_path: Path) -> None:
    ct, masks = _phantom()
    _write_kbp_case(tmp_path / "src" / "p", ct, masks)
    # The cord again, on a grid of half the resolution (2 x 2 x 2 CT voxels per voxel).
    coarse = np.zeros((12, 10, 8), np.uint8)
    coarse[8:10, 4:6, 1:7] = 1  # CT voxels i 16..19, j 8..11, k 2..13
    affine = KBP_AFFINE.copy()
    affine[:3, :3] *= 2.0
    affine[:3, 3] = KBP_AFFINE[:3, :3] @ np.array([0.5, 0.5, 0.5])  # same corner
    nibabel.save(nibabel.Nifti1Image(coarse, affine),
                 tmp_path / "src" / "p" / "segmentations" / "SpinalCord.nii.gz")
    report = import_volume_clinic(tmp_path / "src", tmp_path / "out",
                                  ImportOptions(organ_set="head_neck", crop=False))
    assert report.ok
    assert any("on another grid than the CT were resampled" in p.text
               for p in report.problems)
    case = read_case(tmp_path / "out" / report.cases[0])
    assert case.masks["spinal_cord"].sum() == coarse.sum() * 8  # each voxel -> 2x2x2


def test_two_ct_files_in_one_folder_fail_that_case_only(tmp_path: Path) -> None:
    ct, masks = _phantom()
    _write_kbp_case(tmp_path / "src" / "a", ct, masks)
    _write_kbp_case(tmp_path / "src" / "b", ct, masks)
    nibabel.save(nibabel.Nifti1Image(ct, KBP_AFFINE), tmp_path / "src" / "b" / "image.nii")
    report = import_volume_clinic(tmp_path / "src", tmp_path / "out",
                                  ImportOptions(organ_set="head_neck", crop=False))
    assert len(report.cases) == 1 and len(report.failed) == 1
    errors = [p.text for p in report.problems if p.severity == "error"]
    assert len(errors) == 1 and "2 CT files (ct.nii.gz, image.nii)" in errors[0]
