"""Secure aggregation through real FEDn processes (API, combiner, hooks, S3) and clients.

Three toy clinics (tests/toy_clinic_app.py: deterministic given the global weights), so
the plain FedAvg of every round can be replayed here and compared with what the
masked session produced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_run_e2e import _network_keys, _toy_experiment
from toy_clinic_app import ToyApp

from fedseg.analysis.report import _run_section
from fedseg.analysis.summary import load_run, summarize_run
from fedseg.orchestration.experiment import load_experiment
from fedseg.orchestration.runlog import read_run_info
from fedseg.orchestration.runner import run_experiment

pytestmark = pytest.mark.slow

NAMES = ["clinic-1", "clinic-2", "clinic-3"]
SETTINGS = {"learning_rate": 0.05, "local_steps": 3}


@pytest.fixture(scope="module")
def network_root(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from fedseg.orchestration.network import NetworkConfig, network_down, network_up

    root = tmp_path_factory.mktemp("net")
    network_up(NetworkConfig.from_dict({**_network_keys(), "hooks": True}, source="test",
                                       base=root))
    try:
        yield root
    finally:
        network_down(root)


def _model(run_dir: Path, k: int) -> np.ndarray:
    with np.load(run_dir / "models" / f"round-{k}.npz") as z:
        return np.asarray(z["0"], dtype=np.float64)


def _fedavg(weights: np.ndarray, names: list[str]) -> np.ndarray:
    """Plain FedAvg of one round (every toy clinic has 40 examples)."""
    trained = [ToyApp(n).train([weights.copy()], dict(SETTINGS))[0][0] for n in names]
    return np.mean(trained, axis=0)


def _run(tmp_path: Path, network_root: Path, name: str, rounds: int,
         per_client: dict[str, dict[str, str]] | None = None) -> Any:
    path = _toy_experiment(tmp_path, name, {n: {} for n in NAMES}, rounds=rounds,
                           session={"rounds": rounds, "round_timeout": 6, "min_clients": 1,
                                    "secure_aggregation": True})
    return run_experiment(load_experiment(path), tmp_path / "runs", network_root=network_root,
                          client_env={n: {"FEDSEG_KEEP_UPDATES": "1", **(per_client or {})
                                          .get(n, {})} for n in NAMES})


def test_masked_session_equals_plain_fedavg_and_sends_only_masked_updates(
        tmp_path: Path, network_root: Path) -> None:
    result = _run(tmp_path, network_root, "secure", rounds=3)
    assert result.status == "finished"
    info = read_run_info(result.run_dir)
    assert info["aggregation"] == "secure"
    assert summarize_run(load_run(result.run_dir))["aggregation"] == "secure"  # the report
    assert "Secure aggregation" in _run_section(summarize_run(load_run(result.run_dir)),
                                                info, [])
    journal = info["secure_aggregation"]["rounds"]
    assert [r["status"] for r in journal] == ["keys", "ok", "ok"]
    seed = _model(result.run_dir, 1)  # round 1 exchanges keys: the model is unchanged
    with np.load(result.run_dir / "seed.npz") as z:
        np.testing.assert_array_equal(seed, z["0"])
    r2 = _fedavg(seed, NAMES)
    np.testing.assert_allclose(_model(result.run_dir, 2), r2, atol=1e-6)
    np.testing.assert_allclose(_model(result.run_dir, 3), _fedavg(_model(result.run_dir, 2),
                                                                  NAMES), atol=1e-6)
    # Every update a clinic sent (kept by FEDSEG_KEEP_UPDATES: the exact bytes) is
    # masked ring noise: uint64, nowhere near the clinic's quantised update.
    for name in NAMES:
        kept = sorted((Path(info["clients"][name]["folder"]) / "state" / "updates")
                      .glob("update-*.npz"))
        assert len(kept) == 3
        with np.load(kept[1]) as z:  # FEDn round 2, from the seed
            sent = z["0"]
        own = ToyApp(name).train([seed.copy()], dict(SETTINGS))[0][0] - seed
        assert sent.dtype == np.uint64
        as_plain = sent.view(np.int64).astype(np.float64) / 2.0 ** 24 / 40
        assert np.max(np.abs(as_plain - own)) > 1e6
        meta = json.loads(kept[1].with_suffix(".json").read_text())["training_metadata"]
        assert meta["secagg_masked"] == 1 and meta["num_examples"] == 40


def test_a_clinic_dropping_mid_session_is_recovered_from_shares(
        tmp_path: Path, network_root: Path) -> None:
    # clinic-3 fails its second train call (FEDn round 3) after the others masked
    # against its key: round 3 is parked, round 4 recovers, round 5 has all three again.
    result = _run(tmp_path, network_root, "dropout", rounds=5,
                  per_client={"clinic-3": {"TOY_FAIL_ON_CALL": "2"}})
    assert result.status == "finished"
    journal = read_run_info(result.run_dir)["secure_aggregation"]["rounds"]
    assert [r["status"] for r in journal] == ["keys", "ok", "pending", "recovered", "ok"]
    ids = {n: c["client_id"] for n, c in read_run_info(result.run_dir)["clients"].items()}
    assert journal[2]["dropped"] == [ids["clinic-3"]]
    r2 = _model(result.run_dir, 2)
    np.testing.assert_array_equal(_model(result.run_dir, 3), r2)
    np.testing.assert_allclose(_model(result.run_dir, 4), _fedavg(r2, NAMES[:2]), atol=1e-6)
    np.testing.assert_allclose(_model(result.run_dir, 5),
                               _fedavg(_model(result.run_dir, 4), NAMES), atol=1e-6)
