"""FedAvgM (server momentum) without a network: the update rule, the hook, the settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedseg.orchestration.experiment import parse_experiment
from fedseg.orchestration.server_momentum import (
    FedAvgMServer,
    server_functions_source,
    weighted_mean,
)
from fedseg_clinic.errors import FedsegError


def _updates(*pairs: tuple[float, int]) -> dict[str, list]:
    """Clients whose model is [value * ones(3), value * ones(2, 2)], with n examples."""
    return {f"c{i}": [[np.full(3, v, np.float32), np.full((2, 2), v, np.float32)],
                      {"num_examples": n}]
            for i, (v, n) in enumerate(pairs)}


def test_weighted_mean_uses_num_examples_and_skips_weightless_updates() -> None:
    mean, total = weighted_mean(_updates((1.0, 1), (4.0, 3), (100.0, 0)))
    assert total == 4
    assert np.allclose(mean[0], 3.25) and np.allclose(mean[1], 3.25)
    assert weighted_mean(_updates((1.0, 0))) is None


def test_momentum_zero_and_rate_one_is_fedavg() -> None:
    server = FedAvgMServer([{}], learning_rate=1.0, momentum=0.0)
    glob = [np.zeros(3, np.float32), np.zeros((2, 2), np.float32)]
    for k in range(3):
        updates = _updates((k + 1.0, 2), (k + 3.0, 2))
        new = server.aggregate(glob, updates)
        fedavg, _ = weighted_mean(updates)
        assert all(np.allclose(a, b) for a, b in zip(new, fedavg, strict=True))
        assert new[0].dtype == np.float32
        glob = new


def test_momentum_accumulates_the_fedavg_steps() -> None:
    server = FedAvgMServer([{}], learning_rate=0.5, momentum=0.9)
    glob = [np.zeros(3), np.zeros((2, 2))]
    # Every client moves +1 from the global model each round: delta = 1 every round.
    expected, velocity = 0.0, 0.0
    for _ in range(4):
        value = float(glob[0][0]) + 1.0
        glob = server.aggregate(glob, _updates((value, 5), (value, 7)))
        velocity = 0.9 * velocity + 1.0
        expected += 0.5 * velocity
        assert np.allclose(glob[0], expected) and np.allclose(glob[1], expected)
    assert expected > 4 * 0.5  # momentum took it further than 4 plain half-steps


def test_no_usable_update_keeps_the_global_model() -> None:
    server = FedAvgMServer([{}], learning_rate=1.0, momentum=0.9)
    glob = [np.ones(3)]
    assert server.aggregate(glob, {"c": [[np.zeros(3)], {}]}) is glob


def test_hook_source_runs_like_the_hooks_process_runs_it() -> None:
    table = [{"local_steps": 2}, {"local_steps": 4}]
    source = server_functions_source(table, "n1", learning_rate=0.5, momentum=0.0)
    assert source != server_functions_source(table, "n2", 0.5, 0.0)
    namespace: dict = {}
    exec(compile(source, "server_functions", "exec"), namespace)
    functions = namespace["ServerFunctions"]()
    assert [functions.client_settings(global_model=[]) for _ in range(3)] == \
        [table[0], table[1], table[1]]
    new = functions.aggregate([np.zeros(3)], {"a": [[np.full(3, 2.0)], {"num_examples": 1}]})
    assert np.allclose(new[0], 1.0)  # 0 + 0.5 * (2 - 0)


def _doc(session: dict) -> dict:
    return {"name": "m", "seed": 1, "data": {"phantoms": {"preset": "non-iid"}},
            "session": {"rounds": 2, **session}}


def test_experiment_accepts_fedavgm_and_names_bad_kwargs(tmp_path: Path) -> None:
    exp = parse_experiment(_doc({"aggregator": "fedavgm",
                                 "aggregator_kwargs": {"learning_rate": 1, "momentum": 0.9}}),
                           "x.yaml", tmp_path)
    assert exp.session.aggregator == "fedavgm" and exp.session.server_hook
    assert exp.session.aggregator_kwargs == {"learning_rate": 1.0, "momentum": 0.9}
    assert not parse_experiment(_doc({}), "x.yaml", tmp_path).session.server_hook
    for kwargs, message in (({"momentum": 1.0}, "momentum: must be below 1"),
                            ({"serveropt": "adam"}, "unknown fedavgm kwarg"),
                            ({"momentum": -0.1}, "must be a finite non-negative number")):
        with pytest.raises(FedsegError, match=f"x.yaml: session.aggregator_kwargs.*{message}"):
            parse_experiment(_doc({"aggregator": "fedavgm", "aggregator_kwargs": kwargs}),
                             "x.yaml", tmp_path)
    with pytest.raises(FedsegError, match="secure_aggregation: works with fedavg only"):
        parse_experiment(_doc({"aggregator": "fedavgm", "secure_aggregation": True}),
                         "x.yaml", tmp_path)
