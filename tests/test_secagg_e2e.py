"""Secure aggregation through real FEDn processes (API, combiner, hooks, S3) and clients.

Three toy clinics (tests/toy_clinic_app.py: deterministic given the global weights), so
the plain FedAvg of every round can be replayed here and compared with what the
masked session produced.
"""

from __future__ import annotations

import json
import zlib
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


DDP_PRIVACY = {"distributed": True, "noise_multiplier": 1.0, "l2_norm_clip": 1.0,
               "delta": 1e-3, "secure_randomness": False}


def _replayed_sum(name: str, weights: np.ndarray, index: int) -> np.ndarray:
    """What clinic ``name`` contributed in its ``index``-th distributed round (0-based)."""
    from fedseg_clinic.privacy import skellam
    from fedseg_clinic.privacy.distributed import noised_sum

    toy = ToyApp(name)
    share = (DDP_PRIVACY["noise_multiplier"] * skellam.CLIP_UNITS) ** 2 / 2  # m = 2 of 3
    seed = zlib.crc32(name.encode()) * 1000 + index
    return noised_sum(toy.clipped_gradients(weights, 1.0), 4, 1.0, share,
                      skellam.noise_rng(seed))


def test_distributed_dp_session_takes_noised_dp_gd_steps_and_logs_the_trust(
        tmp_path: Path, network_root: Path) -> None:
    from fedseg_clinic.privacy import skellam

    path = _toy_experiment(tmp_path, "ddp", {n: {} for n in NAMES}, rounds=3,
                           session={"rounds": 3, "round_timeout": 6, "min_clients": 1,
                                    "secure_aggregation": True},
                           clinic={"privacy": DDP_PRIVACY})
    result = run_experiment(load_experiment(path), tmp_path / "runs",
                            network_root=network_root,
                            client_env={n: {"FEDSEG_KEEP_UPDATES": "1"} for n in NAMES})
    assert result.status == "finished"
    info = read_run_info(result.run_dir)
    assert info["aggregation"] == "secure" and info["privacy_mode"] == "distributed"
    journal = info["secure_aggregation"]["rounds"]
    assert [r["status"] for r in journal] == ["keys", "ok", "ok"]
    assert [r.get("dp_mode") for r in journal[1:]] == ["distributed", "distributed"]
    # Each round is one DP-GD step on the federation: w - lr * Z / (s * N_total), with Z
    # the exact sum of the three clinics' noised integer sums (replayed here).
    model = _model(result.run_dir, 1)
    for k, index in ((2, 0), (3, 1)):
        z = sum(_replayed_sum(n, model, index) for n in NAMES)
        expected = model - 0.05 * z.astype(np.float64) / (skellam.CLIP_UNITS * 120)
        np.testing.assert_allclose(_model(result.run_dir, k), expected, rtol=1e-12)
        model = _model(result.run_dir, k)
    # What left a clinic is masked ring noise, not its sum.
    kept = sorted((Path(info["clients"]["clinic-1"]["folder"]) / "state" / "updates")
                  .glob("update-*.npz"))
    with np.load(kept[1]) as f:
        sent = f["0"]
    own = _replayed_sum("clinic-1", _model(result.run_dir, 1), 0)
    assert sent.dtype == np.uint64 and not np.array_equal(sent.view(np.int64), own)
    # Epsilon per clinic, the epsilon without the other clinics' shares, and the trust.
    eps = skellam.epsilon([skellam.segment_for(1.0, 2)], 1e-3)
    alone = skellam.epsilon([skellam.segment_for(1.0 / np.sqrt(2), 2)], 1e-3)
    ddp = info["distributed_dp"]["clients"]
    assert sorted(ddp) == NAMES
    for name in NAMES:
        assert ddp[name]["epsilon"] == pytest.approx(eps, rel=1e-9)
        assert ddp[name]["epsilon_if_alone"] == pytest.approx(alone, rel=1e-9)
        assert ddp[name]["honest_shares"] == 2 and ddp[name]["clinics"] == 3
        assert "at least 2 honest noise shares" in ddp[name]["trust"]
    rows = (result.run_dir / "rounds.csv").read_text()
    assert "epsilon_if_alone" in rows and "dp_distributed" in rows
    section = _run_section(summarize_run(load_run(result.run_dir)), info, [])
    assert "Distributed DP" in section and "honest noise shares" in section
