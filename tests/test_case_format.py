from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedseg_clinic.cases import (
    Case,
    CaseMeta,
    Manifest,
    assign_splits,
    manifest_entry,
    read_case,
    read_manifest,
    write_case,
    write_manifest,
)
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.organs import AliasTable, normalise_name


def _case(case_id: str = "case-1", organs: tuple[str, ...] = ("body", "heart")) -> Case:
    shape = (4, 5, 6)
    image = np.arange(np.prod(shape), dtype=np.int16).reshape(shape) - 60
    masks = {o: np.zeros(shape, bool) for o in organs}
    if "heart" in masks:
        masks["heart"][1:3, 2:4, 2:4] = True
    meta = CaseMeta(case_id=case_id, patient_pseudonym="p1", shape=shape, spacing=(3.0, 1.0, 1.0),
                    labelled_organs=organs, source="test")
    return Case(meta=meta, image=image, masks=masks)


def test_case_round_trip(tmp_path: Path) -> None:
    case = _case()
    folder = write_case(case, tmp_path)
    back = read_case(folder)
    np.testing.assert_array_equal(back.image, case.image)
    assert back.image.dtype == np.int16
    assert set(back.masks) == {"body", "heart"}
    assert back.masks["heart"].sum() == 8
    assert back.meta.spacing == (3.0, 1.0, 1.0)
    assert back.mask("esophagus") is None
    # no temporary folders left behind
    assert [p.name for p in tmp_path.iterdir()] == ["case-1"]


def test_write_case_refuses_overwrite_and_mismatch(tmp_path: Path) -> None:
    write_case(_case(), tmp_path)
    with pytest.raises(FedsegError, match="already exists"):
        write_case(_case(), tmp_path)
    bad = _case("case-2")
    bad.masks["heart"] = np.zeros((1, 1, 1), bool)
    with pytest.raises(FedsegError, match="mask heart shape"):
        write_case(bad, tmp_path)
    assert not (tmp_path / "case-2").exists()
    unlabelled = _case("case-3")
    unlabelled.masks["lung_left"] = np.zeros((4, 5, 6), bool)
    with pytest.raises(FedsegError, match="labelled_organs"):
        write_case(unlabelled, tmp_path)


def test_read_case_reports_bad_sidecar(tmp_path: Path) -> None:
    folder = write_case(_case(), tmp_path)
    (folder / "case.json").write_text("{not json")
    with pytest.raises(FedsegError, match=r"case\.json"):
        read_case(folder)
    with pytest.raises(FedsegError, match="not a case folder"):
        read_case(tmp_path / "nope")


def test_manifest_round_trip_and_errors(tmp_path: Path) -> None:
    meta = _case().meta
    write_manifest(Manifest(clinic="c1", cases=[manifest_entry(meta, "train")]), tmp_path)
    manifest = read_manifest(tmp_path)
    assert manifest.clinic == "c1"
    assert manifest.split("train")[0].labelled_organs == ("body", "heart")
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["cases"][0]["split"] = "test"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(FedsegError, match="split 'test'"):
        read_manifest(tmp_path)
    with pytest.raises(FedsegError, match="does not exist"):
        read_manifest(tmp_path / "missing")


@pytest.mark.parametrize(("n", "fraction", "expected_val"), [(10, 0.2, 2), (2, 0.2, 1), (1, 0.5, 0),
                                                             (5, 0.0, 0)])
def test_assign_splits(n: int, fraction: float, expected_val: int) -> None:
    ids = [f"c{i}" for i in range(n)]
    splits = assign_splits(ids, fraction, seed=3)
    assert sum(v == "val" for v in splits.values()) == expected_val
    assert splits == assign_splits(list(reversed(ids)), fraction, seed=3)


@pytest.mark.parametrize(
    ("name", "organ"),
    [("Lt Lung", "lung_left"), ("LUNG_LT", "lung_left"), ("lung-l", "lung_left"),
     ("Rt Lung", "lung_right"), ("BODY", "body"), ("External", "body"), ("Heart", "heart"),
     ("SpinalCord", "spinal_cord"), ("Oesophagus", "esophagus"), ("Tumor Bed", None)],
)
def test_alias_table(name: str, organ: str | None) -> None:
    assert AliasTable().canonical(name) == organ


def test_alias_table_from_file(tmp_path: Path) -> None:
    path = tmp_path / "aliases.json"
    path.write_text(json.dumps({"heart": ["Herz"]}))
    table = AliasTable.from_file(path)
    assert table.canonical("HERZ") == "heart"
    assert normalise_name(" Lung_L ") == "lungl"
    path.write_text(json.dumps({"liver": ["Leber"]}))
    with pytest.raises(FedsegError, match="unknown organ 'liver'"):
        AliasTable.from_file(path)
    path.write_text(json.dumps({"heart": ["Lt Lung"]}))
    with pytest.raises(FedsegError, match="maps to both"):
        AliasTable.from_file(path)


def test_written_case_data_is_owner_only(tmp_path: Path) -> None:
    """CT, masks, sidecar and manifest are 0600 in a 0700 folder, whatever the umask."""
    import os

    old = os.umask(0o000)
    try:
        folder = write_case(_case(), tmp_path)
        write_manifest(Manifest(clinic="c1", cases=[manifest_entry(_case().meta, "train")]),
                       tmp_path)
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o700
    assert sorted((p.name, p.stat().st_mode & 0o777) for p in folder.iterdir()) == [
        ("case.json", 0o600), ("image.npy", 0o600), ("masks.npz", 0o600)]
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == 0o600
    assert read_case(folder).meta == _case().meta
