"""fedseg predict (RTSTRUCT, SEG, NIfTI) round trips and fedseg model export."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from rt_utils import RTStructBuilder
from scipy import ndimage

from fedseg.cli import cli
from fedseg.orchestration.export import export_model
from fedseg.orchestration.phantoms import generate_benchmark, preset_spec
from fedseg.orchestration.runlog import GLOBAL, RoundRecord, write_rounds, write_run_info
from fedseg_clinic.cases import Case, read_case
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.imaging.importer import ImportOptions, import_clinic
from fedseg_clinic.imaging.volumes import import_volume_clinic, read_volume
from fedseg_clinic.model.bundle import CARD_KEYS, load_model, read_card
from fedseg_clinic.model.metrics import dice
from fedseg_clinic.model.record import FOLDER_RECORD_NAME, write_record
from fedseg_clinic.model.unet import UNetConfig, build_unet
from fedseg_clinic.model.weights import save_weights_npz
from fedseg_clinic.prediction import masks_from_labels, predict_path, predict_volume

pytestmark = pytest.mark.slow

THORAX_MODEL = {"levels": 2, "base_filters": 4, "groups": 2}
HN_MODEL = {"levels": 2, "base_filters": 4, "groups": 2, "organ_set": "head_neck"}


def _fake_run(run_dir: Path, model_config: dict, rounds: int = 2) -> Path:
    """A run folder as `fedseg run` leaves it: run.json, rounds.csv, models/."""
    config = UNetConfig.from_dict(model_config)
    for k in range(1, rounds + 1):
        model = build_unet(config, seed=k)
        save_weights_npz([np.asarray(w) for w in model.get_weights()],
                         run_dir / "models" / f"round-{k}.npz")
    write_record(run_dir / "models" / FOLDER_RECORD_NAME, config)
    write_run_info(run_dir, {
        "name": run_dir.name, "status": "finished", "started_at": "2026-12-06T05:00:00Z",
        "config": {"model": model_config, "session": {"aggregator": "fedavg"},
                   "clinic": {"training": {"hu_window": [-900, 900]},
                              "validation": {"patch_size": [16, 16, 16], "overlap": 0.25}}}})
    records = []
    for k in range(1, rounds + 1):
        for client, eps in (("clinic-a", 1.5 * k), ("clinic-b", 2.5 * k)):
            records += [RoundRecord(k, client, "epsilon", eps),
                        RoundRecord(k, client, "delta", 1e-3),
                        RoundRecord(k, client, "noise_multiplier", 1.1),
                        RoundRecord(k, client, "l2_norm_clip", 1.0),
                        RoundRecord(k, client, "dp", 1.0),
                        RoundRecord(k, client, "n_val", 2.0)]
        for organ in config.organs.organs:
            records.append(RoundRecord(k, GLOBAL, f"val_dice_{organ}", 0.1 * k))
        records.append(RoundRecord(k, GLOBAL, "val_dice_mean", 0.1 * k))
    write_rounds(run_dir, records)
    return run_dir


@pytest.fixture(scope="module")
def dicom_patients(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two phantom patients as DICOM CT series (their RTSTRUCTs removed)."""
    out = tmp_path_factory.mktemp("dicom") / "bench"
    generate_benchmark(preset_spec("iid", clinics=1, patients=2, size=24, seed=5), out,
                       dicom=True)
    patients = out / "dicom" / "clinic-1"
    for path in patients.rglob("*"):
        if path.is_file() and pydicom.dcmread(path, stop_before_pixels=True).Modality != "CT":
            path.unlink()
    return patients


def _series_folders(patients: Path) -> list[Path]:
    return sorted({p.parent for p in patients.rglob("*") if p.is_file()})


def test_rtstruct_round_trip_and_export(tmp_path: Path, dicom_patients: Path) -> None:
    run = _fake_run(tmp_path / "runs" / "thorax-run", THORAX_MODEL)
    # Export round 2 with its card; predict accepts it without the run folder.
    exported = export_model(run, 2, tmp_path / "exported")
    card = read_card(exported)
    assert set(CARD_KEYS) <= set(card)
    assert card["organ_set"]["name"] == "thorax" and card["round"] == 2 and card["rounds"] == 2
    assert card["patch_size"] == [16, 16, 16] and card["hu_window"] == [-900.0, 900.0]
    assert card["clinics"] == ["clinic-a", "clinic-b"]
    assert card["privacy"]["clinic-b"]["epsilon"] == pytest.approx(5.0)
    assert card["privacy"]["clinic-a"]["delta"] == pytest.approx(1e-3)
    assert card["privacy"]["clinic-a"]["dp"] is True
    assert card["validation_dice"]["per_organ"]["heart"] == pytest.approx(0.2)
    assert card["run"]["name"] == "thorax-run"
    shutil.rmtree(run)  # self-contained: the run folder is gone

    series_dir = _series_folders(dicom_patients)[0]
    loaded = load_model(exported)
    results = predict_path(exported, series_dir, tmp_path / "pred")
    rs_path = results[0].outputs[0]
    ds = pydicom.dcmread(rs_path)
    ct = pydicom.dcmread(next(series_dir.iterdir()), stop_before_pixels=True)
    assert ds.Modality == "RTSTRUCT" and ds.StudyInstanceUID == ct.StudyInstanceUID
    frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == ct.FrameOfReferenceUID
    series_ref = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert series_ref.SeriesInstanceUID == ct.SeriesInstanceUID
    names = [r.ROIName for r in ds.StructureSetROISequence]
    assert names and set(names) <= {"External", "Lung_L", "Lung_R", "Heart", "SpinalCord",
                                    "Esophagus"}
    assert all(len(c.ROIDisplayColor) == 3 for c in ds.ROIContourSequence)
    # Contours sit on the slices they reference (z of the contour = z of that slice).
    slice_z = {}
    for f in series_dir.iterdir():
        h = pydicom.dcmread(f, stop_before_pixels=True)
        slice_z[h.SOPInstanceUID] = float(h.ImagePositionPatient[2])
    for roi in ds.ROIContourSequence:
        for contour in roi.ContourSequence:
            z = np.asarray(contour.ContourData, float).reshape(-1, 3)[:, 2]
            ref = contour.ContourImageSequence[0].ReferencedSOPInstanceUID
            assert np.allclose(z, slice_z[ref], atol=0.01)

    # import(predict(ct)) gives back the predicted masks.
    roundtrip = tmp_path / "roundtrip"
    roundtrip.mkdir()
    for f in series_dir.iterdir():
        (roundtrip / f.name).symlink_to(f)
    (roundtrip / "RS.dcm").symlink_to(rs_path)
    report = import_clinic(roundtrip, tmp_path / "cases", ImportOptions(crop=False, salt="t"))
    assert report.ok, [p.line() for p in report.problems]
    case = read_case(tmp_path / "cases" / report.cases[0])
    from fedseg_clinic.imaging.series import read_series

    series = read_series(sorted(series_dir.iterdir()))
    labels = predict_volume(loaded, series.hu, series.geometry)
    predicted = {o: m for o, m in masks_from_labels(labels, loaded.organs).items() if m.any()}
    assert set(case.masks) == set(predicted) and len(predicted) >= 2, sorted(predicted)
    for organ, mask in predicted.items():
        assert dice(case.masks[organ], mask) >= 0.95, organ

    # A third-party reader agrees: rt-utils (what many clinics' scripts use) loads the
    # RTSTRUCT against the series and rasterises each ROI onto the same slices.
    rt_struct = RTStructBuilder.create_from(str(series_dir), str(rs_path))
    order = [series.sop_uids.index(ds.SOPInstanceUID) for ds in rt_struct.series_data]
    clinical = {loaded.organs.clinical_names[o]: o for o in predicted}
    assert set(rt_struct.get_roi_names()) == set(clinical)
    for name, organ in clinical.items():
        mask = rt_struct.get_roi_mask_by_name(name)  # (rows, columns, slice in its order)
        volume = np.zeros_like(predicted[organ])
        volume[order] = np.moveaxis(mask, 2, 0)
        ours = predicted[organ]
        # Same slices; every predicted voxel inside rt-utils' fill, and its fill within one
        # voxel of ours in plane (OpenCV's fillPoly counts boundary pixels as inside, ours
        # is half-open, so on a speckled mask the two differ by up to one voxel ring).
        assert np.array_equal(volume.any(axis=(1, 2)), ours.any(axis=(1, 2))), name
        assert (volume & ours).sum() == ours.sum(), name
        ring = ndimage.binary_dilation(ours, structure=np.ones((1, 3, 3), bool))
        assert not (volume & ~ring).any(), name

    # The same series as a DICOM SEG (highdicom), readable back by the importer.
    seg = predict_path(exported, series_dir, tmp_path / "seg", "seg")[0].outputs[0]
    seg_ds = pydicom.dcmread(seg)
    assert seg_ds.Modality == "SEG"
    segback = tmp_path / "segback"
    segback.mkdir()
    for f in series_dir.iterdir():
        (segback / f.name).symlink_to(f)
    (segback / "SEG.dcm").symlink_to(seg)
    report = import_clinic(segback, tmp_path / "segcases", ImportOptions(crop=False, salt="t"))
    assert report.ok, [p.line() for p in report.problems]
    case = read_case(tmp_path / "segcases" / report.cases[0])
    for organ, mask in predicted.items():
        assert dice(case.masks[organ], mask) >= 0.95, organ


def test_folder_of_patients_with_progress_and_bad_input(tmp_path: Path,
                                                        dicom_patients: Path) -> None:
    run = _fake_run(tmp_path / "run", THORAX_MODEL, rounds=1)
    runner = CliRunner()
    result = runner.invoke(cli, ["predict", "--model", str(run / "models" / "round-1.npz"),
                                 "--ct", str(dicom_patients), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("[1/2] ") and lines[1].startswith("[2/2] ")
    assert "segmented 2 patient(s)" in lines[-1]
    written = sorted((tmp_path / "out").rglob("RS.fedseg.dcm"))
    assert len(written) == 2
    # Bad input: one line, exit 1, no traceback.
    for args, expected in (
        (["--model", str(tmp_path / "nope"), "--ct", str(dicom_patients)], "does not exist"),
        (["--model", str(run / "models" / "round-1.npz"), "--ct", str(tmp_path / "x")],
         "CT path does not exist"),
        (["--model", str(run), "--ct", str(dicom_patients)], "not an exported model"),
    ):
        result = runner.invoke(cli, ["predict", *args, "--out", str(tmp_path / "o2")])
        assert result.exit_code == 1, result.output
        assert expected in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
    result = runner.invoke(cli, ["model", "export", str(run), "--round", "3", "--out",
                                 str(tmp_path / "e")])
    assert result.exit_code == 1 and "no global model of round 3 (rounds saved: 1)" in \
        result.output


def _reimport_label_map(ct: Path, outputs: list[Path], tmp_path: Path) -> Case:
    """Import a predicted NIfTI label map (and its table) beside its CT, as a clinic would."""
    case_dir = tmp_path / "back" / "p"
    case_dir.mkdir(parents=True)
    (case_dir / "ct.nii.gz").symlink_to(ct)
    for path in outputs:
        (case_dir / path.name).symlink_to(path)
    report = import_volume_clinic(case_dir, tmp_path / "cases",
                                  ImportOptions(organ_set="head_neck", crop=False))
    assert report.ok, [p.line() for p in report.problems]
    return read_case(tmp_path / "cases" / report.cases[0])


def test_nifti_round_trip_on_head_neck(tmp_path: Path) -> None:
    from conftest import write_head_neck_volumes

    src = write_head_neck_volumes(tmp_path / "src", patients=1)
    run = _fake_run(tmp_path / "run", HN_MODEL, rounds=1)
    ct = src / "pt_1" / "ct.nii.gz"
    model = run / "models" / "round-1.npz"
    with pytest.raises(FedsegError, match="needs a DICOM CT series"):
        predict_path(model, ct, tmp_path / "x", "rtstruct")
    out = tmp_path / "pred"
    result = predict_path(model, ct, out, "nifti")[0]
    table = json.loads((out / "labels.json").read_text())
    assert table["organ_set"]["name"] == "head_neck" and table["labels"]["1"] == "brainstem"
    # Re-import: the CT beside the predicted label map and its table.
    case = _reimport_label_map(ct, result.outputs, tmp_path)
    loaded = load_model(model)
    volume = read_volume(ct)
    labels = predict_volume(loaded, volume.hu, volume.geometry)
    predicted = {o: m for o, m in masks_from_labels(labels, loaded.organs).items() if m.any()}
    assert predicted and set(case.masks) == set(predicted)
    for organ, mask in predicted.items():
        assert dice(case.masks[organ], mask) >= 0.95, organ

    assert not math.isnan(float(np.mean(labels)))


def test_local_model_of_a_partial_protocol_labels_only_its_organs(tmp_path: Path) -> None:
    """A local-only model of a clinic without larynx contours never writes larynx."""
    from conftest import write_head_neck_volumes

    src = write_head_neck_volumes(tmp_path / "src", patients=1)
    ct = src / "pt_1" / "ct.nii.gz"
    run = _fake_run(tmp_path / "runs" / "hn-local", HN_MODEL, rounds=1)
    config = UNetConfig.from_dict(HN_MODEL)
    weights = [np.asarray(w) for w in build_unet(config, seed=1).get_weights()]
    # The head's bias makes larynx (class 6) the most probable class everywhere: what an
    # uncontoured organ's channel may learn under the marginal loss.
    assert weights[-1].shape == (config.n_classes,)
    weights[-1] = weights[-1].copy()
    weights[-1][config.organs.class_index("larynx")] += 20.0
    weights[-1][config.organs.class_index("spinal_cord")] += 10.0
    save_weights_npz(weights, run / "models" / "round-1.npz")  # full record: all organs
    local = run / "models" / "clinic-b" / "round-1.npz"
    save_weights_npz(weights, local)
    trained = ["brainstem", "spinal_cord", "parotid_left", "parotid_right", "mandible"]
    write_record(local.parent / FOLDER_RECORD_NAME, config, trained)

    full = load_model(run / "models" / "round-1.npz")
    assert full.organs_trained is None and full.organs_excluded == ()
    volume = read_volume(ct)
    assert (predict_volume(full, volume.hu, volume.geometry) == 6).all()
    loaded = load_model(local)
    assert loaded.organs_trained == tuple(trained)
    assert loaded.organs_excluded == ("esophagus", "larynx")
    assert loaded.hu_window == (-900.0, 900.0)  # run.json three folders up
    assert loaded.card["organs_trained"] == trained
    labels = predict_volume(loaded, volume.hu, volume.geometry)
    assert (labels == config.organs.class_index("spinal_cord")).all()

    lines: list[str] = []
    result = predict_path(local, ct, tmp_path / "pred", "nifti", progress=lines.append)[0]
    assert result.organs_found == ["spinal_cord"]
    assert any(line.startswith("note: ") and "not predicted: esophagus, larynx" in line
               for line in lines), lines
    table = json.loads((tmp_path / "pred" / "labels.json").read_text())
    assert sorted(table["labels"].values()) == sorted(trained)
    # Re-imported, the prediction says larynx is unknown, not contoured and empty.
    case = _reimport_label_map(ct, result.outputs, tmp_path)
    assert "larynx" not in case.meta.labelled_organs
    assert "spinal_cord" in case.meta.labelled_organs

    # A card with a foreign organ: one-line refusal naming the card.
    exported = export_model(run, 1, tmp_path / "exported")
    card_path = exported / "model_card.json"
    card = json.loads(card_path.read_text())
    assert "organs_trained" not in card  # the federated round's record lists none
    card["organs_trained"] = ["larynx", "heart"]
    card_path.write_text(json.dumps(card))
    with pytest.raises(FedsegError, match=r"model_card\.json: organs_trained names heart"):
        load_model(exported)
    card["organs_trained"] = ["larynx"]
    card_path.write_text(json.dumps(card))
    assert load_model(exported).organs_excluded == tuple(
        o for o in config.organs.organs if o != "larynx")


def test_prediction_at_the_model_spacing_lands_back_on_the_ct_grid() -> None:
    """A model trained at 2x the CT's spacing: resample, segment, put back (nearest)."""
    from fedseg_clinic.imaging.series import Geometry
    from fedseg_clinic.model.bundle import LoadedModel
    from fedseg_clinic.organs import THORAX
    from fedseg_clinic.tf_env import keras

    # A "model" that calls a voxel class 4 (heart) where the windowed CT is > 0.
    inputs = keras.Input((None, None, None, 1))
    logits = keras.layers.Conv3D(7, 1, use_bias=False)(inputs)
    model = keras.Model(inputs, keras.layers.Softmax()(logits))
    kernel = np.zeros((1, 1, 1, 1, 7), np.float32)
    kernel[..., 0, 0], kernel[..., 0, 4] = -20.0, 20.0
    model.layers[1].set_weights([kernel])
    hu = np.full((20, 40, 36), -1000.0, np.float32)
    hu[5:15, 10:30, 8:26] = 500.0  # a bright box, off-centre
    geometry = Geometry(shape=hu.shape, spacing=(2.0, 1.0, 1.0), origin=(-10.0, 5.0, 3.0),
                        direction=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
    loaded = LoadedModel(model=model, config=UNetConfig(levels=2, base_filters=4, groups=2),
                         patch_size=(8, 16, 16), overlap=0.25, hu_window=(-1000.0, 1000.0),
                         spacing=(4.0, 2.0, 2.0), source=Path("m"), card={})
    labels = predict_volume(loaded, hu, geometry)
    assert labels.shape == hu.shape
    heart = labels == THORAX.class_index("heart")
    # Resampling to 2x spacing loses at most the box's edge voxels; a misplaced grid
    # (shifted, flipped, scaled) would move the box's centre.
    assert dice(heart, hu > 0) >= 0.85
    assert np.allclose(np.argwhere(heart).mean(0), np.argwhere(hu > 0).mean(0), atol=1.0)
    assert set(np.unique(labels)) <= {0, THORAX.class_index("heart")}


def test_scout_in_series_and_enhanced_ct(tmp_path: Path, dicom_patients: Path) -> None:
    """A scout saved inside the series is left out; an enhanced multi-frame CT gives a
    NIfTI label map, and an RTSTRUCT and a SEG that reference its frames and import back."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage
    from pydicom.uid import generate_uid

    model = _fake_run(tmp_path / "run", THORAX_MODEL, rounds=1) / "models" / "round-1.npz"
    series_dir = _series_folders(dicom_patients)[0]
    files = sorted(series_dir.iterdir())
    with_scout = tmp_path / "with-scout"
    shutil.copytree(series_dir, with_scout)
    scout = pydicom.dcmread(files[0])
    scout.SOPInstanceUID = scout.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # coronal, same series UID
    scout.save_as(with_scout / "scout.dcm")
    result = predict_path(model, with_scout, tmp_path / "p1", "nifti")[0]
    assert read_volume(result.outputs[0]).hu.shape[0] == len(files)

    # A scout in its own series (coronal) is no patient: left out with a note; a topogram
    # flagged LOCALIZER (axial-looking) is skipped by the scan. The CT alone is segmented.
    scout.SeriesInstanceUID = generate_uid()
    scout.save_as(with_scout / "scout.dcm")
    topogram = pydicom.dcmread(files[1])
    topogram.SOPInstanceUID = topogram.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    topogram.SeriesInstanceUID = generate_uid()
    topogram.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    topogram.save_as(with_scout / "topogram.dcm")
    lines: list[str] = []
    results = predict_path(model, with_scout, tmp_path / "p1b", "nifti", progress=lines.append)
    assert len(results) == 1 and read_volume(results[0].outputs[0]).hu.shape[0] == len(files)
    notes = [line for line in lines if line.startswith("note: left out series")]
    assert len(notes) == 1 and scout.SeriesInstanceUID in notes[0], lines
    assert "a coronal image, not an axial CT volume" in notes[0]

    image = LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(f) for f in files], series_instance_uid=generate_uid(),
        series_number=9, sop_instance_uid=generate_uid(), instance_number=1)
    (tmp_path / "enhanced").mkdir()
    image.save_as(tmp_path / "enhanced" / "ct.dcm")
    result = predict_path(model, tmp_path / "enhanced", tmp_path / "p2", "nifti")[0]
    labels = read_volume(result.outputs[0])
    assert labels.hu.shape[0] == len(files)
    expected = {o: m for o, m in masks_from_labels(np.asarray(labels.hu).astype(np.uint8),
                                                   load_model(model).organs).items()
                if m.any()}
    assert len(expected) >= 2
    # RTSTRUCT and SEG on the enhanced CT reference its frames, and import back.
    for fmt in ("rtstruct", "seg"):
        out = predict_path(model, tmp_path / "enhanced", tmp_path / f"p-{fmt}", fmt)[0]
        written = pydicom.dcmread(out.outputs[0])
        if fmt == "rtstruct":
            refs = [c.ContourImageSequence[0] for roi in written.ROIContourSequence
                    for c in roi.ContourSequence]
            assert {r.ReferencedSOPInstanceUID for r in refs} == {image.SOPInstanceUID}
            assert {r.ReferencedSOPClassUID for r in refs} == {image.SOPClassUID}
            assert all(1 <= int(r.ReferencedFrameNumber) <= len(files) for r in refs)
        back = tmp_path / f"back-{fmt}"
        back.mkdir()
        (back / "ct.dcm").symlink_to(tmp_path / "enhanced" / "ct.dcm")
        (back / "labels.dcm").symlink_to(out.outputs[0])
        report = import_clinic(back, tmp_path / f"cases-{fmt}",
                               ImportOptions(crop=False, salt="t"))
        assert report.ok, [p.line() for p in report.problems]
        case = read_case(tmp_path / f"cases-{fmt}" / report.cases[0])
        assert set(case.masks) == set(expected), fmt
        for organ, mask in expected.items():
            assert dice(case.masks[organ], mask) >= 0.95, (fmt, organ)
