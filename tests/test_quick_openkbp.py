"""experiments/scripts/quick_openkbp.py on five real OpenKBP patients (4 train, 1 held-out)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from fedseg_clinic.cases import read_manifest
from fedseg_clinic.model.weights import load_weights_npz
from fedseg_clinic.organs import HEAD_NECK

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).resolve().parents[1] / "experiments" / "scripts"
TINY = ["--set", "patch_size=16,16,16", "--set", "batch_size=1", "--set",
        "foreground_fraction=0.9", "--model", "levels=2", "--model", "base_filters=4",
        "--model", "groups=2"]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kbp_split(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The study's split of pt_1..pt_4 (one per clinic) and held-out pt_201, at 6 mm."""
    src = shared_data / "open-kbp"
    if not (src / "train-pats" / "pt_1" / "ct.nii.gz").is_file():
        pytest.skip(f"OpenKBP is absent from {src}")
    out = tmp_path_factory.mktemp("kbp") / "split"
    code = _script("split_openkbp").main([
        "--src", str(src), "--out", str(out), "--heldout", "1",
        "--clinic-sizes", "1", "1", "1", "1", "--spacing", "6", "6", "6"])
    assert code == 0
    return out


def test_quick_run_scores_every_block(kbp_split: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "quick.jsonl"
    code = _script("quick_openkbp").main([
        "--data", str(kbp_split), "--steps", "3", "--every", "2", "--cases", "1",
        "--out", str(out), *TINY])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 3]  # blocks of --every, the last one shorter
    # What the 4 train patients contour: none of them has esophagus or larynx, so the
    # pooled model is never trained on them and does not predict them.
    trained = {o for name in ("clinic-a", "clinic-b", "clinic-c", "clinic-d")
               for e in read_manifest(kbp_split / "clinics" / name).split("train")
               for o in e.labelled_organs}
    excluded = [o for o in HEAD_NECK.organs if o not in trained]
    assert excluded == ["esophagus", "larynx"]
    assert "not predicted (no clinic contours them): esophagus, larynx" in printed.out
    heldout = read_manifest(kbp_split / "clinics" / "clinic-a").split("val")[0]
    scored = [o for o in heldout.labelled_organs if o not in excluded]
    for row in rows:
        assert row["organs_excluded"] == excluded
        assert list(row["dice"]) == list(HEAD_NECK.organs)
        # Scored exactly where the held-out patient is contoured and the model predicts.
        assert sorted(o for o, v in row["dice"].items() if v is not None) == sorted(scored)
        values = [row["dice"][o] for o in scored]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert row["mean"] == pytest.approx(float(np.mean(values)), abs=1e-4)
        assert math.isfinite(row["train_loss"]) and row["train_loss"] > 0
        assert row["settings"]["patch_size"] == [16, 16, 16]
        assert row["model"]["base_filters"] == 4 and row["model"]["organ_set"] == "head_neck"
    assert rows[1]["wall_seconds"] > rows[0]["wall_seconds"]
    # The final weights, in the clinic code's npz format, fit the tiny model.
    weights = load_weights_npz(tmp_path / ".quick" / "weights.npz")
    assert len(weights) > 0 and weights[-1].shape == (HEAD_NECK.n_classes,)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set", "learning_rate"], "expected KEY=VALUE, got 'learning_rate'"),
        (["--set", "lerning_rate=0.1"], "--set: unknown training setting(s) lerning_rate"),
        (["--set", "patch_size=17,17,17"], "patch size (17, 17, 17)"),
        (["--set", "learning_rate=-1"], "learning_rate must be > 0"),
        (["--model", "filters=4"], "unknown key(s) filters"),
        (["--clinics", "clinic-z"], "clinic-z: data folder does not exist"),
        (["--steps", "0"], "--steps, --every and --cases must be >= 1"),
    ],
)
def test_bad_input_is_one_line(kbp_split: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str], args: list[str],
                               fragment: str) -> None:
    out = tmp_path / "bad.jsonl"
    argv = ["--data", str(kbp_split), "--steps", "1", "--every", "1", "--out", str(out),
            *TINY, *args]
    try:
        code = _script("quick_openkbp").main(argv)
    except SystemExit as exc:  # the KEY=VALUE parser exits like argparse
        code, err = 1, str(exc.code)
    else:
        err = capsys.readouterr().err
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not out.exists()


def test_missing_split_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = _script("quick_openkbp").main(["--data", str(tmp_path / "nowhere"), "--steps",
                                          "1", "--every", "1", "--out",
                                          str(tmp_path / "q.jsonl")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err == (f"error: {tmp_path / 'nowhere' / 'clinics'}: no clinics "
                                 "folder (give the --out folder of split_openkbp.py as --data)")
