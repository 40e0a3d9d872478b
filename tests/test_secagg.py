"""Secure aggregation: primitives and the whole protocol between clinic and server objects.

The objects are the ones FEDn runs (SecAggClinic in the callback client, SecAggServer in
the hooks process); here they talk directly, round by round, so every branch (all
answer, one drops and is recovered, too many drop) is checked in well under a second.
The same path through real FEDn processes is in test_secagg_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedseg.orchestration.secure_aggregation import (
    SecAggServer,
    read_journal,
    server_functions_source,
)
from fedseg_clinic.privacy import secagg
from fedseg_clinic.privacy.secagg_clinic import SecAggClinic

SHAPES = [(3, 4), (5,)]
QUANT = 2.0 ** -secagg.SCALE_BITS


def _same(x: list[np.ndarray], y: list[np.ndarray]) -> bool:
    return len(x) == len(y) and all(np.array_equal(a, b) for a, b in zip(x, y, strict=True))


def _weights(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.normal(size=s).astype(np.float32) for s in SHAPES]


def test_quantise_round_trip_and_negative_values_wrap_in_the_ring() -> None:
    deltas = [np.array([-1.5, 0.0, 2.25, -3e-7]), np.array([[7.0]])]
    q = secagg.quantise(deltas, weight=3)
    assert all(a.dtype == np.uint64 for a in q)
    back = secagg.dequantise(q, total_weight=3)
    for d, b in zip(deltas, back, strict=True):
        np.testing.assert_allclose(b, d, atol=QUANT)
    with pytest.raises(secagg.SecAggError, match="too large"):
        secagg.quantise([np.array([1e12])], weight=100)
    with pytest.raises(secagg.SecAggError, match="not finite"):
        secagg.quantise([np.array([np.nan])], weight=1)


def test_pair_masks_cancel_exactly_and_the_sum_is_the_weighted_mean() -> None:
    rng = np.random.default_rng(0)
    ids = ["a", "b", "c", "d"]
    keys = {i: secagg.new_private_key() for i in ids}
    public = {i: secagg.public_bytes(k) for i, k in keys.items()}
    deltas = {i: _weights(rng) for i in ids}
    weights = {"a": 3, "b": 10, "c": 1, "d": 7}
    total = secagg.ring_zeros(SHAPES)
    for i in ids:
        values = secagg.quantise(deltas[i], weights[i])
        plain = [v.copy() for v in values]
        secagg.apply_pair_masks(values, i, keys[i], public, "s|1")
        # A single masked update looks nothing like the update.
        assert not any(np.array_equal(v, p) for v, p in zip(values, plain, strict=True))
        secagg.ring_add(total, values)
    mean = secagg.dequantise(total, sum(weights.values()))
    expected = [sum(weights[i] * deltas[i][t].astype(np.float64) for i in ids)
                / sum(weights.values()) for t in range(len(SHAPES))]
    for m, e in zip(mean, expected, strict=True):
        # Each clinic rounds once (<= half a step), then the sum is divided by the weight.
        np.testing.assert_allclose(m, e, atol=len(ids) * QUANT / sum(weights.values()))


def test_shamir_shares_rebuild_a_key_from_any_threshold_subset_only() -> None:
    raw = secagg.private_bytes(secagg.new_private_key())
    shares = secagg.split_key(raw, ["b", "c", "d", "e"], threshold=3)
    assert secagg.combine_key([shares["e"], shares["b"], shares["d"]], 3) == raw
    assert secagg.combine_key([shares["b"], shares["c"]], 2) != raw  # 2 < 3: garbage
    with pytest.raises(secagg.SecAggError, match="2 shares, 3 needed"):
        secagg.combine_key([shares["b"], shares["c"]], 3)
    with pytest.raises(secagg.SecAggError):
        secagg.split_key(raw, ["b"], threshold=2)


def test_shares_are_bound_to_sender_recipient_and_round() -> None:
    a, b = secagg.new_private_key(), secagg.new_private_key()
    token = secagg.encrypt_share(a, secagg.public_bytes(b), b"x" * 33, "s", "a>b@2")
    assert secagg.decrypt_share(b, secagg.public_bytes(a), token, "s", "a>b@2") == b"x" * 33
    with pytest.raises(secagg.SecAggError, match="does not decrypt"):
        secagg.decrypt_share(b, secagg.public_bytes(a), token, "s", "a>b@3")


class _Toy:
    """A clinic that 'trains' by adding a fixed step; the plain FedAvg is easy to replay."""

    def __init__(self, seed: int, n: int) -> None:
        self.step = _weights(np.random.default_rng(seed))
        self.n = n

    def train(self, weights: list[np.ndarray]) -> tuple[list[np.ndarray], dict[str, Any]]:
        return [w + s for w, s in zip(weights, self.step, strict=True)], {"num_examples": self.n}


def _round(server: SecAggServer, clinics: dict[str, SecAggClinic], toys: dict[str, _Toy],
           model: list[np.ndarray], answering: set[str]) -> tuple[list[np.ndarray], dict]:
    """One FEDn round: settings, every answering clinic's update, aggregate."""
    settings = server.client_settings()
    updates = {}
    for cid in sorted(answering):
        out, meta = clinics[cid].handle(settings["secagg"], model,
                                        lambda c=cid: toys[c].train(model))
        updates[cid] = [out, meta]
    return server.aggregate(model, updates), updates


def _setup(tmp_path: Path, n: int = 3) -> tuple[SecAggServer, dict, dict, list[np.ndarray]]:
    ids = [f"c{i}" for i in range(n)]
    server = SecAggServer("sess", [{"learning_rate": 0.1}], tmp_path / "journal.jsonl")
    clinics = {c: SecAggClinic(c) for c in ids}
    toys = {c: _Toy(i, 10 * (i + 1)) for i, c in enumerate(ids)}
    return server, clinics, toys, _weights(np.random.default_rng(99))


def _fedavg(model: list[np.ndarray], toys: list[_Toy]) -> list[np.ndarray]:
    total = sum(t.n for t in toys)
    return [m + sum(t.n * t.step[i].astype(np.float64) for t in toys) / total
            for i, m in enumerate(model)]


def test_protocol_all_answer_then_one_drops_and_is_recovered(tmp_path: Path) -> None:
    server, clinics, toys, model = _setup(tmp_path)
    ids = set(clinics)
    after_keys, _ = _round(server, clinics, toys, model, ids)          # round 1: keys only
    assert _same(after_keys, model)
    r2, updates = _round(server, clinics, toys, model, ids)           # round 2: all mask
    for got, want in zip(r2, _fedavg(model, list(toys.values())), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)              # float32 model
    # What the server got from one clinic is uniform-looking ring noise, not its update.
    sent = updates["c0"][0]
    plain = secagg.quantise([s.astype(np.float64) for s in toys["c0"].step], toys["c0"].n)
    assert sent[0].dtype == np.uint64 and not np.array_equal(sent[0], plain[0])
    r3, _ = _round(server, clinics, toys, r2, ids - {"c2"})          # c2 drops after keys
    assert _same(r3, r2)           # parked, unchanged
    r4, _ = _round(server, clinics, toys, r3, ids)                    # recovery round
    for got, want in zip(r4, _fedavg(r2, [toys["c0"], toys["c1"]]), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    r5, _ = _round(server, clinics, toys, r4, ids)                    # c2 back in
    for got, want in zip(r5, _fedavg(r4, list(toys.values())), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    journal = read_journal(tmp_path / "journal.jsonl")
    assert [j["status"] for j in journal] == ["keys", "ok", "pending", "recovered", "ok"]
    assert journal[2]["dropped"] == ["c2"] and journal[3]["survivors"] == ["c0", "c1"]


def test_below_threshold_the_round_fails_and_says_why(tmp_path: Path) -> None:
    server, clinics, toys, model = _setup(tmp_path)
    ids = set(clinics)
    _round(server, clinics, toys, model, ids)
    r2, _ = _round(server, clinics, toys, model, ids)
    r3, _ = _round(server, clinics, toys, r2, {"c0"})  # two of three drop: one survivor
    assert _same(r3, r2)
    last = read_journal(tmp_path / "journal.jsonl")[-1]
    assert last["status"] == "failed" and "1 of 3 clinics answered, 2 needed" in last["reason"]
    # The two that vanished sent no keys for round 4: it re-keys them, round 5 trains.
    r4, _ = _round(server, clinics, toys, r3, ids)
    assert _same(r4, r3)
    r5, _ = _round(server, clinics, toys, r4, ids)
    for got, want in zip(r5, _fedavg(r4, list(toys.values())), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert [j["status"] for j in read_journal(tmp_path / "journal.jsonl")] == \
        ["keys", "ok", "failed", "keys", "ok"]


def test_drop_in_the_first_keyed_round_fails_cleanly_no_shares_yet(tmp_path: Path) -> None:
    server, clinics, toys, model = _setup(tmp_path)
    _round(server, clinics, toys, model, set(clinics))
    r2, _ = _round(server, clinics, toys, model, {"c0", "c1"})
    assert _same(r2, model)
    last = read_journal(tmp_path / "journal.jsonl")[-1]
    assert last["status"] == "failed" and "never shared" in last["reason"]


def test_recovery_fails_when_survivors_vanish_before_revealing(tmp_path: Path) -> None:
    server, clinics, toys, model = _setup(tmp_path, n=4)  # threshold 3
    ids = set(clinics)
    for _ in range(2):
        model, _ = _round(server, clinics, toys, model, ids)
    parked, _ = _round(server, clinics, toys, model, ids - {"c3"})
    after, _ = _round(server, clinics, toys, parked, {"c0", "c1"})  # c2 gone too
    assert _same(after, parked)
    last = read_journal(tmp_path / "journal.jsonl")[-1]
    assert last["status"] == "failed" and "2 shares of dropped clinic c3" in last["reason"]


def test_two_clinics_never_mask_so_the_server_never_gets_a_sum_of_two(
        tmp_path: Path) -> None:
    server, clinics, toys, model = _setup(tmp_path, n=2)
    for _ in range(3):
        after, updates = _round(server, clinics, toys, model, set(clinics))
        assert _same(after, model)
        assert all(u[1]["secagg_masked"] == 0 for u in updates.values())
    assert {j["status"] for j in read_journal(tmp_path / "journal.jsonl")} == {"keys"}


def test_an_honest_clinic_refuses_to_reveal_for_too_few_survivors() -> None:
    clinic = SecAggClinic("c0")
    payload = {"session": "s", "round": 4, "phase": "recover", "keyed": {}, "c_pk": {},
               "recover": {"round": 3, "dropped": ["c1", "c2"], "survivors": ["c0"],
                           "threshold": 2, "shares": {}}}
    with pytest.raises(secagg.SecAggError, match="refusing to reveal"):
        clinic.handle(json.dumps(payload), [np.zeros(2)], lambda: ([], {}))


def test_server_functions_source_runs_like_the_hooks_process_runs_it(tmp_path: Path) -> None:
    source = server_functions_source([{"learning_rate": 0.2}], "n1", tmp_path / "j.jsonl")
    namespace: dict = {}
    exec(compile(source, "server_functions", "exec"), namespace)
    functions = namespace["ServerFunctions"]()
    settings = functions.client_settings(global_model=[])
    assert settings["learning_rate"] == 0.2
    assert json.loads(settings["secagg"])["phase"] == "train"
    assert functions.aggregate([np.ones(2)], {})[0].tolist() == [1.0, 1.0]
    assert read_journal(tmp_path / "j.jsonl")[0]["status"] == "keys"


@pytest.mark.slow
def test_inversion_recognises_the_plain_update_not_the_masked_one() -> None:
    """Same client, batch, step and noise (none): the attack that recovers the patch from
    the plain update (as in test_inversion) finds nothing in what the server stores."""
    from fedseg.analysis.leakage import inversion as inv
    from fedseg_clinic.model.unet import UNetConfig

    config = UNetConfig(levels=2, base_filters=8)
    settings = inv.ClientSettings(0.1, 1, 1, (8, 8, 8), 1.0)
    attack = inv.AttackConfig(iterations=150)
    plain, _, _ = inv.attack_simulated(config, settings, 0.0, attack, seed=0)
    masked, _, _ = inv.attack_simulated(config, settings, 0.0, attack, seed=0,
                                        secure_aggregation=True)
    assert plain["recognisable"] and not plain["secure_aggregation"]
    assert masked["secure_aggregation"] and not masked["recognisable"]
    assert masked["ssim"] < plain["ssim"] - 0.2


@pytest.mark.parametrize(("session", "clinics", "route", "message"), [
    ({"aggregator": "fedopt"}, 3, "callback", "works with fedavg only"),
    ({}, 3, "package", "needs clients.route: callback"),
    ({}, 2, "callback", "needs at least 3 clinics"),
])
def test_experiment_refuses_secure_aggregation_it_cannot_run(
        session: dict[str, Any], clinics: int, route: str, message: str) -> None:
    from fedseg.orchestration.experiment import parse_experiment
    from fedseg_clinic.errors import FedsegError

    doc = {"name": "s", "data": {"phantoms": {"clinics": clinics}},
           "session": {"secure_aggregation": True, **session}, "clients": {"route": route}}
    with pytest.raises(FedsegError, match=f"session.secure_aggregation: {message}"):
        parse_experiment(doc, "x.yaml")
    doc["session"]["secure_aggregation"] = False
    parse_experiment(doc, "x.yaml")  # the same experiment, plain, is fine


def test_invert_cli_secure_aggregation_needs_a_simulated_client(tmp_path: Path) -> None:
    from helpers import fedseg_cli

    (tmp_path / "w.npz").write_bytes(b"")
    result = fedseg_cli(["attack", "invert", "--out", str(tmp_path / "o"), "--secure-aggregation",
                         "--global-weights", str(tmp_path / "w.npz"),
                         "--client-weights", str(tmp_path / "w.npz")])
    assert result.exit_code == 1 and "--secure-aggregation needs --simulate" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_an_internal_error_fails_the_round_instead_of_fedns_fallback(tmp_path: Path) -> None:
    server, clinics, toys, model = _setup(tmp_path)
    _round(server, clinics, toys, model, set(clinics))
    settings = server.client_settings()
    updates = {c: [None, clinics[c].handle(settings["secagg"], model,
                                           lambda c=c: toys[c].train(model))[1]]
               for c in clinics}  # metadata fine, the model bytes lost
    assert _same(server.aggregate(model, updates), model)
    last = read_journal(tmp_path / "journal.jsonl")[-1]
    assert last["status"] == "failed" and "internal error" in last["reason"]


def test_a_clinic_that_requires_secure_aggregation_never_sends_a_plain_update() -> None:
    import io

    from fedn.utils.helpers.helpers import get_helper

    from fedseg_clinic.errors import FedsegError
    from fedseg_clinic.fedn_callback import CallbackAdapter

    class App:
        def train(self, weights: list, settings: dict) -> tuple[list, dict]:
            return weights, {"num_examples": 1}

        def validate(self, weights: list) -> dict:
            return {}

    buf = io.BytesIO()
    get_helper("numpyhelper").save([np.zeros(3)], buf)
    CallbackAdapter(App()).train(io.BytesIO(buf.getvalue()), {})  # plain clinic: fine
    with pytest.raises(FedsegError, match="refusing to send a plain update"):
        CallbackAdapter(App(), require_secagg=True).train(io.BytesIO(buf.getvalue()), {})
