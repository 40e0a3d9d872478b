"""Organ sets per treatment site: channels, labels, loss, metrics, records and refusals."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedseg.orchestration.phantoms import generate_benchmark, preset_spec
from fedseg.orchestration.runner import check_data_organ_set
from fedseg_clinic.cases import check_organ_set, read_manifest, write_manifest
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.model.losses import loss_for, per_example_loss
from fedseg_clinic.model.metrics import organ_metrics
from fedseg_clinic.model.record import (
    check_weights_organ_set,
    find_record,
    read_record,
    record_organs_trained,
    write_record,
)
from fedseg_clinic.model.seed import write_seed_weights
from fedseg_clinic.model.unet import UNetConfig, build_unet, class_known, labels_from_masks
from fedseg_clinic.organs import HEAD_NECK, ORGAN_SETS, ORGANS, THORAX, AliasTable, organ_set

HN_MODEL = {"levels": 2, "base_filters": 4, "groups": 2, "organ_set": "head_neck"}


def test_sets_and_their_records() -> None:
    assert THORAX.organs == ORGANS and THORAX.n_classes == 7
    assert HEAD_NECK.organs == ("brainstem", "spinal_cord", "parotid_left", "parotid_right",
                                "esophagus", "larynx", "mandible")
    assert HEAD_NECK.n_classes == 8 and HEAD_NECK.container is None
    assert set(ORGAN_SETS) == {"thorax", "head_neck"}
    for s in ORGAN_SETS.values():
        assert set(s.clinical_names) == set(s.organs) == set(s.colours)
        s.check_record(s.to_json(), "here")  # its own record passes
    with pytest.raises(FedsegError, match=r"unknown organ set 'pelvis' \(known: thorax"):
        organ_set("pelvis")
    with pytest.raises(FedsegError, match=r"built for organ set thorax@v1 .* organ set "
                                          r"head_neck@v1"):
        HEAD_NECK.check_record(THORAX.to_json(), "model m.npz")
    older = dict(HEAD_NECK.to_json(), version=0)
    with pytest.raises(FedsegError, match="head_neck@v0"):
        HEAD_NECK.check_record(older, "x")
    table = AliasTable()
    assert [table.canonical(n) for n in ("LeftParotid", "RightParotid", "Brainstem",
                                         "SpinalCord", "Larynx", "Mandible", "Esophagus")] == [
        "parotid_left", "parotid_right", "brainstem", "spinal_cord", "larynx", "mandible",
        "esophagus"]


def test_model_channels_follow_the_set() -> None:
    config = UNetConfig.from_dict(HN_MODEL)
    assert config.n_classes == 8 and config.organs is HEAD_NECK
    assert config.to_dict()["organ_set"] == "head_neck"
    model = build_unet(config, seed=0)
    assert model.output_shape[-1] == 8
    assert UNetConfig().n_classes == 7  # thorax stays the default
    with pytest.raises(FedsegError, match="n_classes must be 8"):
        UNetConfig(levels=2, base_filters=4, groups=2, organ_set="head_neck", n_classes=7)
    with pytest.raises(FedsegError, match="unknown organ set"):
        UNetConfig(organ_set="abdomen")


def test_labels_known_classes_and_metrics_of_head_neck() -> None:
    shape = (4, 6, 6)
    cord = np.zeros(shape, bool)
    cord[:, 2:4, 2:4] = True
    parotid = np.zeros(shape, bool)
    parotid[1:3, 0:3, 0:3] = True  # overlaps the cord at [1:3, 2, 2]
    labels = labels_from_masks({"spinal_cord": cord, "parotid_left": parotid}, shape,
                               HEAD_NECK)
    assert labels[1, 2, 2] == HEAD_NECK.class_index("spinal_cord")  # cord painted last
    assert labels[1, 0, 0] == 3 and labels.max() == 3
    known = class_known(["spinal_cord"], HEAD_NECK)
    assert known.tolist() == [1, 0, 1, 0, 0, 0, 0, 0]
    with pytest.raises(FedsegError, match="not in organ set head_neck"):
        labels_from_masks({"heart": cord}, shape, HEAD_NECK)
    metrics = organ_metrics(labels, {"spinal_cord": cord}, ["spinal_cord"], (1, 1, 1),
                            HEAD_NECK)
    assert metrics["val_dice_spinal_cord"] == pytest.approx(1.0)
    assert math.isnan(metrics["val_dice_larynx"]) and "val_dice_body" not in metrics
    assert metrics["val_dice_mean"] == pytest.approx(1.0)


def test_loss_merges_unknown_organs_into_background_without_a_container() -> None:
    """With no body class, a voxel of an uncontoured organ is background in the labels:
    predicting that organ there costs nothing, predicting a contoured one does."""
    loss = loss_for(HEAD_NECK)
    assert loss_for(THORAX) is per_example_loss
    labels = np.zeros((1, 4, 4, 4), np.int32)
    labels[0, :2] = HEAD_NECK.class_index("spinal_cord")
    known = class_known(["spinal_cord"], HEAD_NECK)[None]

    def probs(second: int) -> np.ndarray:
        p = np.full((1, 4, 4, 4, 8), 1e-4, np.float32)
        p[0, :2, ..., 2] = 1.0 - 7e-4
        p[0, 2:, ..., second] = 1.0 - 7e-4
        return p

    larynx, brainstem_unknown = HEAD_NECK.class_index("larynx"), 0
    as_bg = float(loss(labels, probs(brainstem_unknown), known)[0])
    as_unknown = float(loss(labels, probs(larynx), known)[0])
    assert as_unknown == pytest.approx(as_bg, abs=1e-4)
    as_cord = float(loss(labels, probs(2), known)[0])  # a known organ where bg is
    assert as_cord > as_bg + 0.5
    # The thorax merge (into body = class 1) would treat class 1 (brainstem) specially.
    thorax_style = float(per_example_loss(labels, probs(larynx), known)[0])
    assert np.isfinite(thorax_style)


@pytest.fixture(scope="module")
def thorax_clinic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("thorax") / "phantoms"
    generate_benchmark(preset_spec("iid", clinics=1, patients=4, size=24, seed=3), out)
    return out / "clinic-1"


def test_clinic_data_of_another_set_is_refused(thorax_clinic: Path, head_neck_clinic: Path,
                                                tmp_path: Path) -> None:
    check_organ_set(thorax_clinic, THORAX)
    check_organ_set(head_neck_clinic, HEAD_NECK)
    with pytest.raises(FedsegError) as info:
        check_organ_set(thorax_clinic, HEAD_NECK)
    line = str(info.value)
    assert "\n" not in line and str(thorax_clinic) in line
    assert "organ set thorax@v1" in line and "head_neck@v1" in line
    # A folder written before organ sets (no record) is judged by its labelled organs.
    legacy = tmp_path / "legacy"
    manifest = read_manifest(thorax_clinic)
    manifest.extra.pop("organ_set")
    legacy.mkdir()
    write_manifest(manifest, legacy)
    check_organ_set(legacy, THORAX)
    with pytest.raises(FedsegError, match="labels organ\\(s\\) body, heart, lung_left"):
        check_organ_set(legacy, HEAD_NECK)
    # `fedseg run` checks every clinic before it starts anything.
    exp = types.SimpleNamespace(model=HN_MODEL)
    assert check_data_organ_set(exp, {"a": head_neck_clinic}) is HEAD_NECK
    with pytest.raises(FedsegError, match=r"clinic data .*thorax@v1"):
        check_data_organ_set(exp, {"a": head_neck_clinic, "b": thorax_clinic})


def test_seed_records_its_organ_set(tmp_path: Path) -> None:
    seed = write_seed_weights(HN_MODEL, tmp_path / "seed.npz", seed=1)
    record_path = find_record(seed)
    assert record_path == tmp_path / "seed.json"
    record = read_record(record_path)
    assert record["organ_set"] == HEAD_NECK.to_json()
    assert record["model"]["organ_set"] == "head_neck" and record["model"]["n_classes"] == 8
    check_weights_organ_set(seed, "head_neck")
    with pytest.raises(FedsegError, match=f"model {seed}: built for organ set head_neck@v1"):
        check_weights_organ_set(seed, THORAX)


@pytest.mark.slow
def test_clinic_trains_head_neck_and_refuses_a_thorax_server(
        head_neck_clinic: Path, tmp_path: Path, thorax_clinic: Path) -> None:
    from fedseg_clinic.app import ClinicApp
    from fedseg_clinic.settings import load_settings

    settings = {"model": HN_MODEL,
                "training": {"local_steps": 2, "batch_size": 2, "patch_size": [16, 16, 16],
                             "seed": 1},
                "privacy": {"enabled": False},
                "validation": {"patch_size": [16, 16, 16], "overlap": 0.25}}
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump(settings))
    env = {"FEDSEG_SETTINGS": str(path), "FEDSEG_DATA_DIR": str(head_neck_clinic),
           "FEDSEG_STATE_DIR": str(tmp_path / "state")}
    app = ClinicApp(load_settings(env))
    weights = [np.asarray(w) for w in app.model.get_weights()]
    new, meta = app.train(weights, {})
    assert np.isfinite(meta["train_loss"])
    metrics = app.validate(new)
    assert {"val_dice_parotid_left", "val_dice_mandible", "val_hd95_brainstem"} <= set(metrics)
    assert "val_dice_body" not in metrics and math.isnan(metrics["val_dice_larynx"])
    # A global model of the thorax set (7 output classes) is refused in one line.
    thorax_weights = [np.asarray(w) for w in build_unet(
        UNetConfig(levels=2, base_filters=4, groups=2)).get_weights()]
    for call in (lambda: app.train(thorax_weights, {}), lambda: app.validate(thorax_weights)):
        with pytest.raises(FedsegError, match="global model has 7 output classes, but this "
                                              "clinic trains organ set head_neck@v1"):
            call()
    with pytest.raises(FedsegError, match="server's global model: built for organ set thorax"):
        app.train(new, {"organ_set": "thorax"})
    # Thorax data under a head-and-neck model: refused before any model is built.
    env_thorax = dict(env, FEDSEG_DATA_DIR=str(thorax_clinic))
    with pytest.raises(FedsegError, match="thorax@v1"):
        ClinicApp(load_settings(env_thorax))
    json.dumps(metrics)  # the metrics travel as JSON


def test_round_log_summary_follows_the_run_organ_set(tmp_path: Path) -> None:
    from fedseg.analysis.summary import load_run, organ_names, summarize_run
    from fedseg.orchestration.runlog import RoundRecord, write_rounds, write_run_info

    write_run_info(tmp_path, {"name": "hn", "organ_set": HEAD_NECK.to_json()})
    write_rounds(tmp_path, [RoundRecord(1, "c", f"val_dice_{o}", 0.5)
                            for o in ("mandible", "brainstem", "parotid_left")]
                 + [RoundRecord(1, "c", "val_dice_mean", 0.5)])
    run = load_run(tmp_path)
    assert organ_names(run) == ["brainstem", "parotid_left", "mandible"]  # the set's order
    assert summarize_run(run)["organ_set"] == "head_neck@v1"


def test_dicom_import_keeps_only_the_chosen_set(shared_data: Path, tmp_path: Path) -> None:
    import shutil

    from fedseg_clinic.cases import read_case
    from fedseg_clinic.imaging.importer import ImportOptions, import_clinic

    segs = shared_data / "dcmqi" / "data" / "segmentations"
    src = tmp_path / "src"
    shutil.copytree(segs / "ct-3slice", src / "p")
    for name in ("heart_seg.nrrd", "spine_seg.nrrd"):
        shutil.copy(segs / name, src / name)
    aliases = AliasTable({"spinal_cord": ["spine"]})
    report = import_clinic(src, tmp_path / "out", ImportOptions(
        crop=False, aliases=aliases, organ_set="head_neck"))
    case = read_case(tmp_path / "out" / report.cases[0])
    assert case.meta.labelled_organs == ("spinal_cord",)
    assert int(case.masks["spinal_cord"].sum()) == 12439
    assert any("'heart' (heart) is not in the organ set" in p.text for p in report.problems)
    assert read_manifest(tmp_path / "out").extra["organ_set"]["name"] == "head_neck"
    with pytest.raises(FedsegError, match="unknown organ set"):
        import_clinic(src, tmp_path / "o2", ImportOptions(organ_set="pelvis"))


def test_record_keeps_organs_trained_in_set_order(tmp_path: Path) -> None:
    config = UNetConfig(levels=2, base_filters=4, organ_set="head_neck")
    path = write_record(tmp_path / "models" / "clinic-b" / "model.json", config,
                        ["mandible", "spinal_cord", "brainstem"])
    record = read_record(path)
    assert record["organs_trained"] == ["brainstem", "spinal_cord", "mandible"]
    assert record_organs_trained(record, config, str(path)) == (
        "brainstem", "spinal_cord", "mandible")
    assert find_record(tmp_path / "models" / "clinic-b" / "round-3.npz") == path
    # No list: the whole set (a federated run's record).
    full = read_record(write_record(tmp_path / "full.json", config))
    assert "organs_trained" not in full and record_organs_trained(full, config, "x") is None
    with pytest.raises(FedsegError, match=r"bad\.json: organs_trained names heart, not in "
                                          r"organ set head_neck"):
        record_organs_trained({**record, "organs_trained": ["heart"]}, config, "bad.json")
    with pytest.raises(FedsegError, match="must be a list"):
        record_organs_trained({**record, "organs_trained": "larynx"}, config, "bad.json")
    with pytest.raises(FedsegError, match="heart"):
        write_record(tmp_path / "never.json", config, ["heart"])
    assert not (tmp_path / "never.json").exists()
