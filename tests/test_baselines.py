"""Pooled and local-only baselines on tiny phantoms, with the real ClinicApp."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from fedseg.analysis.summary import load_run, summarize_run
from fedseg.orchestration.baselines import baseline_name, build_pooled_folder, run_baseline
from fedseg.orchestration.experiment import parse_experiment
from fedseg.orchestration.runlog import GLOBAL, pivot, read_rounds, read_run_info
from fedseg_clinic.cases import read_case, read_manifest
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.privacy.accounting import compute_epsilon

ROUNDS = 2
STEPS = 2


def tiny_doc(name: str = "tiny", clinics: int = 2, dp: bool = True) -> dict[str, Any]:
    """A tiny experiment: 2 iid phantom clinics of 5 patients, size 24, 2 x 2 steps."""
    return {
        "name": name,
        "seed": 5,
        "data": {"phantoms": {"preset": "iid", "clinics": clinics,
                              "options": {"patients": 5, "size": 24}}},
        "model": {"levels": 2, "base_filters": 4, "groups": 2},
        "clinic": {
            "training": {"optimizer": "adam", "learning_rate": 0.01, "local_steps": STEPS,
                         "batch_size": 2, "patch_size": [16, 16, 16], "seed": 1},
            "privacy": {"enabled": dp, "noise_multiplier": 1.0, "l2_norm_clip": 1.0,
                        "secure_randomness": False},
            "validation": {"patch_size": [16, 16, 16], "overlap": 0.25, "batch_size": 2},
        },
        "session": {"rounds": ROUNDS},
    }


@pytest.fixture(scope="module")
def pooled_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exp = parse_experiment(tiny_doc(), source="tiny")
    lines: list[str] = []
    result = run_baseline(exp, "pooled", tmp_path_factory.mktemp("runs"), progress=lines.append)
    assert result.status == "finished" and result.rounds_done == ROUNDS
    assert sum(line.startswith("block ") for line in lines) == ROUNDS
    assert "clinic-1 dice" in lines[-1] and "pooled eps" in lines[-1]
    return result.run_dir


@pytest.mark.slow
def test_pooled_round_log(pooled_run: Path) -> None:
    info = read_run_info(pooled_run)
    assert info["kind"] == "pooled" and info["name"] == "tiny-pooled"
    assert info["status"] == "finished" and info["seed"] == 5
    assert info["config"]["name"] == "tiny" and "tensorflow" in info["versions"]
    table = pivot(read_rounds(pooled_run))
    n_pooled = info["baseline"]["n_train_pooled"]
    assert n_pooled == sum(info["baseline"]["n_train"].values())
    for k in range(1, ROUNDS + 1):
        for clinic in ("clinic-1", "clinic-2"):
            row = table[(k, clinic)]
            assert 0.0 <= row["val_dice_mean"] <= 1.0
            assert row["n_val"] >= 1 and "val_dice_heart" in row
            assert "train_loss" not in row  # clinics only validate in the pooled run
        trainer = table[(k, "pooled")]
        # Compute matched: local_steps x clinics steps per block, over the pooled N.
        assert trainer["local_steps"] == STEPS * 2
        assert trainer["num_examples"] == n_pooled
        assert trainer["train_failed"] == 0.0
        expected = compute_epsilon(n_pooled, 2, k * STEPS * 2, 1.0, 1 / (10 * n_pooled))
        assert trainer["epsilon"] == pytest.approx(expected.epsilon, rel=1e-3)
        assert table[(k, GLOBAL)]["round_seconds"] > 0
        assert (pooled_run / "models" / f"round-{k}.npz").is_file()
    # The analysis reads it as a pooled run with the clinics' Dice.
    summary = summarize_run(load_run(pooled_run))
    assert summary["kind"] == "pooled" and summary["final_dice_mean"] is not None


@pytest.mark.slow
def test_local_round_log(tmp_path: Path) -> None:
    exp = parse_experiment(tiny_doc("solo", dp=False), source="tiny")
    result = run_baseline(exp, "local", tmp_path)
    info = read_run_info(result.run_dir)
    assert info["kind"] == "local" and result.run_dir.name == "solo-local"
    table = pivot(read_rounds(result.run_dir))
    assert {c for _k, c in table} == {"clinic-1", "clinic-2", GLOBAL}
    for k in range(1, ROUNDS + 1):
        for clinic in ("clinic-1", "clinic-2"):
            row = table[(k, clinic)]
            assert row["local_steps"] == STEPS and math.isinf(row["epsilon"])
            assert 0.0 <= row["val_dice_mean"] <= 1.0 and math.isfinite(row["train_loss"])
            assert (result.run_dir / "models" / clinic / f"round-{k}.npz").is_file()
    # Clinics train apart: their models differ after round 1.
    with np.load(result.run_dir / "models" / "clinic-1" / "round-1.npz") as a, \
            np.load(result.run_dir / "models" / "clinic-2" / "round-1.npz") as b:
        assert any(not np.array_equal(a[key], b[key]) for key in a.files)


@pytest.mark.slow
def test_local_models_record_their_clinics_organs(tmp_path: Path) -> None:
    """A clinic that never contours cord and esophagus: its model says it was not trained
    on them, and ``fedseg predict`` / scoring load that from the record."""
    from fedseg_clinic.model.bundle import load_model
    from fedseg_clinic.organs import THORAX

    doc = tiny_doc("partial", dp=False)
    doc["data"]["phantoms"]["preset"] = "non-iid"
    doc["session"]["rounds"] = 1
    result = run_baseline(parse_experiment(doc, source="tiny"), "local", tmp_path)
    info = read_run_info(result.run_dir)
    partial = [o for o in THORAX.organs if o not in ("spinal_cord", "esophagus")]
    assert info["baseline"]["organs_trained"] == {"clinic-1": list(THORAX.organs),
                                                  "clinic-2": partial}
    for clinic, organs in info["baseline"]["organs_trained"].items():
        record = json.loads((result.run_dir / "models" / clinic / "model.json").read_text())
        assert record["organs_trained"] == organs
        assert record["organ_set"]["name"] == "thorax"
    loaded = load_model(result.run_dir / "models" / "clinic-2" / "round-1.npz")
    assert loaded.organs_excluded == ("spinal_cord", "esophagus")
    assert loaded.patch_size == (16, 16, 16)  # the run's settings, three folders up
    assert load_model(result.run_dir / "models" / "clinic-1" / "round-1.npz"
                      ).organs_excluded == ()


def test_pooled_folder_merges_train_cases(tmp_path: Path) -> None:
    from fedseg.orchestration.phantoms import generate_benchmark, preset_spec

    generate_benchmark(preset_spec("iid", clinics=2, patients=4, size=24, seed=2),
                       tmp_path / "data")
    dirs = {c: tmp_path / "data" / c for c in ("clinic-1", "clinic-2")}
    out = build_pooled_folder(dirs, tmp_path / "pooled")
    manifest = read_manifest(out)
    expected = [f"{c}--{e.case_id}" for c, d in dirs.items()
                for e in read_manifest(d).split("train")]
    assert [e.case_id for e in manifest.cases] == expected
    assert all(e.split == "train" for e in manifest.cases)
    first = read_case(out / expected[0])  # symlinked case folders read as the originals
    assert expected[0].endswith(first.meta.case_id)


def test_pooled_folder_without_train_cases(tmp_path: Path) -> None:
    from fedseg_clinic.cases import Manifest, write_manifest

    (tmp_path / "c").mkdir()
    write_manifest(Manifest(clinic="c", cases=[]), tmp_path / "c")
    with pytest.raises(FedsegError, match="no training cases"):
        build_pooled_folder({"c": tmp_path / "c"}, tmp_path / "pooled")


@pytest.mark.parametrize("kind", ["federated", "", "POOLED"])
def test_unknown_kind(tmp_path: Path, kind: str) -> None:
    exp = parse_experiment(tiny_doc(), source="tiny")
    with pytest.raises(FedsegError, match="baseline kind"):
        run_baseline(exp, kind, tmp_path)
    assert not (tmp_path / baseline_name(exp, kind)).exists()


def test_other_clinic_app_refused(tmp_path: Path) -> None:
    doc = tiny_doc()
    doc["clients"] = {"app": "toy_clinic_app:ToyApp.from_environment"}
    exp = parse_experiment(doc, source="tiny")
    with pytest.raises(FedsegError, match=r"clients\.app: baselines train with"):
        run_baseline(exp, "pooled", tmp_path)
    assert not (tmp_path / "tiny-pooled").exists()


def test_existing_run_folder_refused(tmp_path: Path) -> None:
    exp = parse_experiment(tiny_doc(), source="tiny")
    (tmp_path / "tiny-local").mkdir()
    (tmp_path / "tiny-local" / "x").write_text("old")
    with pytest.raises(FedsegError, match="not empty"):
        run_baseline(exp, "local", tmp_path)
    assert (tmp_path / "tiny-local" / "x").read_text() == "old"


def test_cli_bad_experiment_one_line(tmp_path: Path) -> None:
    from fedseg.cli import cli

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsession: {rounds: 0}\ndata: {phantoms: {}}\n")
    result = CliRunner().invoke(cli, ["baseline", "pooled", str(bad), "--runs-dir",
                                      str(tmp_path / "runs")])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "session.rounds" in result.output
