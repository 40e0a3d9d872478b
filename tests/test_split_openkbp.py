"""experiments/scripts/split_openkbp.py on a few real OpenKBP patients (the study's split)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from fedseg_clinic.cases import read_manifest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "scripts" / "split_openkbp.py"


def _split_module():
    spec = importlib.util.spec_from_file_location("split_openkbp", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def openkbp_src(shared_data: Path) -> Path:
    src = shared_data / "open-kbp"
    if not (src / "train-pats" / "pt_1" / "ct.nii.gz").is_file():
        pytest.skip(f"OpenKBP is absent from {src}")
    return src


def test_split_gives_each_clinic_its_protocol_and_the_same_heldout(
        openkbp_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    split = _split_module()
    out = tmp_path / "kbp"
    code = split.main(["--src", str(openkbp_src), "--out", str(out), "--heldout", "1",
                       "--clinic-sizes", "1", "1", "1", "1", "--spacing", "6", "6", "6"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "split.json").read_text())
    assert record["spacing"] == [6.0, 6.0, 6.0] and len(record["heldout"]) == 1
    organ_of = {"Brainstem": "brainstem", "SpinalCord": "spinal_cord",
                "LeftParotid": "parotid_left", "RightParotid": "parotid_right",
                "Esophagus": "esophagus", "Larynx": "larynx", "Mandible": "mandible"}
    heldout_targets = set()
    patients = set()
    for name, _, rois in split.CLINICS:
        manifest = read_manifest(out / "clinics" / name)
        train = [e for e in manifest.cases if e.split == "train"]
        val = [e for e in manifest.cases if e.split == "val"]
        assert len(train) == 1 and len(val) == 1, name
        # A structure outside the clinic's protocol is unknown, never absent.
        assert set(train[0].labelled_organs) <= {organ_of[r] for r in rois}, name
        assert train[0].labelled_organs, name
        heldout_targets.add((out / "clinics" / name / val[0].case_id).resolve())
        patients.add(train[0].case_id)
    assert len(heldout_targets) == 1  # every clinic links the same held-out case
    assert len(patients) == 4  # four different train patients
    # clinic-b does not contour esophagus or larynx, clinic-c neither brainstem nor mandible.
    b = read_manifest(out / "clinics" / "clinic-b").cases[0].labelled_organs
    c = read_manifest(out / "clinics" / "clinic-c").cases[0].labelled_organs
    assert not {"esophagus", "larynx"} & set(b) and not {"brainstem", "mandible"} & set(c)

    # An existing --out is refused in one line, nothing changed.
    assert split.main(["--src", str(openkbp_src), "--out", str(out)]) == 1
    assert "exists; remove it" in capsys.readouterr().err
    assert split.main(["--src", str(openkbp_src), "--out", str(tmp_path / "x"),
                       "--clinic-sizes", "1", "0", "1", "1"]) == 1
    assert "at least 1 train patient" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
