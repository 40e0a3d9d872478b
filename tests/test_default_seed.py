"""The recommended default: fedseg run starts from the shipped pretrained seed if it fits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedseg.orchestration.experiment import parse_experiment
from fedseg.orchestration.runner import default_seed_weights, prepare_seed
from fedseg.seed.pretrain import DEMO_PRETRAIN, DEMO_SEED, file_sha256
from fedseg_clinic.errors import FedsegError


def _exp(tmp_path: Path, model: dict, **top: object):
    doc = {"name": "d", "seed": 3, "data": {"phantoms": {"preset": "non-iid"}},
           "model": model, **top}
    return parse_experiment(doc, "d.yaml", tmp_path)


def test_matching_model_starts_from_the_shipped_seed(tmp_path: Path) -> None:
    exp = _exp(tmp_path, dict(DEMO_PRETRAIN.model))
    assert exp.pretrained_default and exp.seed_weights is None
    record = prepare_seed(exp, tmp_path / "seed.npz")
    assert record["kind"] == "pretrained" and record["default"] is True
    assert file_sha256(tmp_path / "seed.npz") == file_sha256(DEMO_SEED)
    sidecar = json.loads((tmp_path / "seed.json").read_text())
    assert sidecar["model"] == dict(DEMO_PRETRAIN.model)


def test_random_or_another_model_or_a_builder_keeps_a_random_seed(tmp_path: Path) -> None:
    for i, exp in enumerate((
            _exp(tmp_path, dict(DEMO_PRETRAIN.model), seed_weights="random"),
            _exp(tmp_path, {"levels": 2, "base_filters": 4, "groups": 2}),
            _exp(tmp_path, dict(DEMO_PRETRAIN.model),
                 seed_builder="fedseg.seed.build:build_seed"))):
        record = prepare_seed(exp, tmp_path / f"seed-{i}.npz")
        assert record["kind"] == "random_init", i
        assert file_sha256(tmp_path / f"seed-{i}.npz") != file_sha256(DEMO_SEED)
    assert default_seed_weights({"levels": 2}) is None
    with pytest.raises(FedsegError, match="seed_weights: give seed_weights or seed_builder"):
        _exp(tmp_path, {}, seed_weights="random", seed_builder="fedseg.seed.build:build_seed")
