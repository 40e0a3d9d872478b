"""Public-pretrained seed: pretraining, its sidecar, and run.json carrying it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from fedseg.cli import cli
from fedseg.orchestration.experiment import parse_experiment
from fedseg.orchestration.runner import prepare_seed
from fedseg.seed.pretrain import (
    DEMO_PRETRAIN,
    DEMO_SEED,
    PretrainSpec,
    pretrain_seed,
    read_seed_info,
    sidecar_path,
)
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.model.weights import load_weights_npz

MODEL = {"levels": 2, "base_filters": 4, "groups": 2}


@pytest.fixture(scope="module")
def tiny_seed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("seed") / "seed.npz"
    spec = PretrainSpec(model=MODEL, patients=5, size=24, steps=3, batch_size=2,
                        patch_size=(16, 16, 16), phantom_seed=99)
    return out, pretrain_seed(spec, out)


@pytest.mark.slow
def test_pretrain_writes_seed_and_sidecar(tiny_seed: tuple[Path, dict]) -> None:
    out, side = tiny_seed
    assert side == json.loads(sidecar_path(out).read_text())
    assert side["public_data"] == {"kind": "phantoms", "preset": "iid", "seed": 99,
                                   "patients": 5, "size": 24}
    assert side["steps"] == 3 and side["dp"] is False and side["model"] == MODEL
    assert 0.0 <= side["dice_mean"] <= 1.0 and "body" in side["dice"]
    assert side["n_train"] + side["n_val"] == 5
    weights = load_weights_npz(out)
    assert sum(w.size for w in weights) > 0
    assert read_seed_info(out, MODEL)["weights_sha256"] == side["weights_sha256"]


@pytest.mark.slow
def test_seed_info_refuses_other_model_weights_or_missing_sidecar(
        tiny_seed: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = tiny_seed
    with pytest.raises(FedsegError, match="pretrained for model"):
        read_seed_info(out, {**MODEL, "base_filters": 8})
    copy = tmp_path / "other.npz"
    copy.write_bytes(out.read_bytes())
    with pytest.raises(FedsegError, match="sidecar is missing"):
        read_seed_info(copy)
    sidecar_path(copy).write_text(sidecar_path(out).read_text())
    copy.write_bytes(out.read_bytes() + b"x")
    with pytest.raises(FedsegError, match="sha256 differs"):
        read_seed_info(copy)


@pytest.mark.slow
def test_run_json_carries_the_pretrained_seed(tiny_seed: tuple[Path, dict],
                                             tmp_path: Path) -> None:
    out, side = tiny_seed
    doc = {"name": "x", "seed": 1, "model": MODEL, "seed_weights": str(out),
           "data": {"phantoms": {"preset": "iid", "clinics": 1}},
           "clinic": {"privacy": {"target_epsilon": 4.0}}, "session": {"rounds": 3}}
    exp = parse_experiment(doc)
    assert exp.clinic["privacy"]["planned_rounds"] == 3  # the target covers the session
    info = prepare_seed(exp, tmp_path / "seed.npz")
    assert info["weights_sha256"] == side["weights_sha256"] and info["path"] == str(out)
    assert (tmp_path / "seed.npz").read_bytes() == out.read_bytes()
    random = prepare_seed(parse_experiment({**doc, "seed_weights": None}), tmp_path / "r.npz")
    assert random["kind"] == "random_init" and random["seed"] == 1
    with pytest.raises(FedsegError, match="pretrained for model"):
        prepare_seed(parse_experiment({**doc, "model": {**MODEL, "levels": 3}}),
                     tmp_path / "y.npz")


@pytest.mark.slow
def test_seed_cli_show_and_bad_input(tiny_seed: tuple[Path, dict], tmp_path: Path) -> None:
    out, side = tiny_seed
    result = CliRunner().invoke(cli, ["seed", "show", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["dice_mean"] == side["dice_mean"]
    result = CliRunner().invoke(cli, ["seed", "show", str(tmp_path / "none.npz")])
    assert result.exit_code == 1 and "does not exist" in result.output
    result = CliRunner().invoke(cli, ["seed", "pretrain", str(tmp_path / "s.npz")])
    assert result.exit_code == 1 and "--model" in result.output


def test_shipped_demo_seed_matches_its_recipe() -> None:
    """The seed in the repository is the one `fedseg seed pretrain --demo` describes."""
    from fedseg.seed.pretrain import DEMO_CONTINUE

    info = read_seed_info(DEMO_SEED, DEMO_PRETRAIN.model)

    def recipe(spec: dict) -> dict:  # init_weights names a file of the build machine
        return {k: v for k, v in spec.items() if k != "init_weights"}

    assert recipe(info["spec"]) == recipe(DEMO_CONTINUE.to_json())
    assert recipe(info["continued_from"]["spec"]) == recipe(DEMO_PRETRAIN.to_json())
    for stage in (info, info["continued_from"]):
        assert stage["public_data"]["seed"] != 7  # not the demo clinics' phantom seed
    assert DEMO_SEED.stat().st_size < 2_000_000
    assert info["dice_mean"] > 0.7  # measured 0.754 (docs/findings.md)
    assert all(np.isfinite(w).all() for w in load_weights_npz(DEMO_SEED))


def test_demo_recipe_is_fixed_on_the_command_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["seed", "pretrain", str(tmp_path / "s.npz"), "--demo",
                                      "--steps", "3"])
    assert result.exit_code == 1 and "drop --steps" in result.output


@pytest.mark.slow
def test_pretrain_on_an_imported_case_folder_with_training_settings(
        head_neck_clinic: Path, tmp_path: Path) -> None:
    """A NIfTI-imported clinic folder as the public set, with the real-CT loss settings."""
    out = tmp_path / "hn-seed.npz"
    model = {**MODEL, "organ_set": "head_neck"}
    result = CliRunner().invoke(cli, [
        "seed", "pretrain", str(out), "--model", json.dumps(model),
        "--cases", str(head_neck_clinic), "--steps", "2", "--batch", "2", "--patch", "16",
        "--training", '{"dice_classes": "present", "foreground_fraction": 0.9}',
        "--val-overlap", "0"])
    assert result.exit_code == 0, result.output
    side = read_seed_info(out, model)
    assert side["public_data"] == {"kind": "cases", "path": str(head_neck_clinic.resolve())}
    assert side["spec"]["training"] == {"dice_classes": "present", "foreground_fraction": 0.9}
    assert side["spec"]["val_overlap"] == 0.0 and side["n_train"] + side["n_val"] == 5
    assert "spinal_cord" in side["dice"] and "body" not in side["dice"]
    # Unknown or clashing training settings are one-line refusals naming the value.
    for bad, message in (('{"dice_clases": "present"}', "dice_clases"),
                         ('{"learning_rate": 0.1}', "'learning_rate'"),
                         ('[1]', "JSON object")):
        result = CliRunner().invoke(cli, [
            "seed", "pretrain", str(tmp_path / "x.npz"), "--model", json.dumps(model),
            "--cases", str(head_neck_clinic), "--steps", "1", "--training", bad])
        assert result.exit_code == 1 and message in result.output, result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "x.npz").exists()
