"""collect.py: fedn API answers (shaped as fedn 0.33.0 returns them) -> round log rows."""

from __future__ import annotations

import json
import math

import pytest

from fedseg.orchestration.collect import assemble, http_time, model_chain, session_rounds
from fedseg.orchestration.runlog import pivot

SID = "sess-B"
OTHER = "sess-A"
SEED = "seed-0"


def _round(round_id: str, session_id: str, status: str = "Finished", start: str = "00",
           end: str = "05", aggregated: int = 2, expected: int = 2) -> dict:
    return {
        "round_id": round_id, "status": status,
        "committed_at": f"Thu, 26 Nov 2026 16:11:{start} GMT",
        "updated_at": f"Thu, 26 Nov 2026 16:11:{end} GMT",
        "round_config": {"session_id": session_id, "round_id": round_id},
        "combiners": [{"model_id": f"combiner-model-{round_id}", "status": "Success",
                       "time_exec_training": 1.5,
                       "data": {"aggregation_time": {"nr_aggregated_models": aggregated},
                                "nr_expected_updates": expected, "time_combination": 0.25}}],
    }


def _update(client: str, round_id: str, **meta: float) -> dict:
    inner = {"training_metadata": {"num_examples": 10, **meta}, "processing_time": 0.5,
             "config": json.dumps({"round_id": round_id, "session_id": SID})}
    return {"type": "MODEL_UPDATE", "log_level": "AUDIT", "status": "Model update completed.",
            "sender": {"name": client}, "session_id": SID,
            "data": json.dumps({"sender": {"name": client}, "meta": json.dumps(inner)})}


def _failure(client: str, round_id: str) -> dict:
    request = {"modelId": "x", "data": json.dumps({"round_id": round_id})}
    return {"type": "MODEL_UPDATE", "log_level": "WARNING", "sender": {"name": client},
            "status": f"FEDSEG_TRAIN_FAILED {client}: BudgetExceededError: eps 8.1 > 8",
            "data": json.dumps(request)}


def _validation(client: str, model_id: str, dice: float, n_val: float = 1.0) -> dict:
    return {"model_id": model_id, "sender": {"name": client},
            "data": json.dumps({"val_dice_mean": dice, "val_dice_heart": math.nan,
                                "n_val": n_val})}


MODELS = {"result": [  # unordered, first parent None (as fedn 0.33.0 answers)
    {"model_id": "g2", "parent_model": "g1", "committed_at": "Thu, 26 Nov 2026 16:11:10 GMT"},
    {"model_id": "g1", "parent_model": None, "committed_at": "Thu, 26 Nov 2026 16:11:05 GMT"},
]}


def test_http_time_parses_fedn_stamps() -> None:
    assert http_time("Thu, 26 Nov 2026 16:11:05 GMT") - http_time(
        "Thu, 26 Nov 2026 16:11:00 GMT") == 5.0
    assert http_time(None) is None
    assert http_time("yesterday") is None


@pytest.mark.parametrize(("models", "expected"), [
    (MODELS, ["g1", "g2"]),
    ({"result": []}, []),
    ({"result": [{"model_id": "g1", "parent_model": SEED}]}, ["g1"]),
])
def test_model_chain_follows_parent_links(models: dict, expected: list[str]) -> None:
    assert model_chain(models, SEED) == expected


def test_rounds_of_other_sessions_are_ignored_and_renumbered() -> None:
    rounds = {"result": [_round("4", SID), _round("1", OTHER), _round("3", SID),
                         _round("2", OTHER)]}
    infos = session_rounds(rounds, SID, ["g1", "g2"])
    assert [(r.index, r.round_id, r.model_id) for r in infos] == [(1, "3", "g1"), (2, "4", "g2")]
    assert infos[0].seconds == 5.0
    assert infos[0].combination_s == 0.25 and infos[0].aggregated_updates == 2.0


def test_a_failed_round_commits_no_model() -> None:
    rounds = {"result": [_round("1", SID, status="Failed", aggregated=0), _round("2", SID)]}
    infos = session_rounds(rounds, SID, ["g1"])
    assert [r.model_id for r in infos] == ["", "g1"]


def test_assemble_end_to_end() -> None:
    rounds = {"result": [_round("1", OTHER), _round("3", SID), _round("4", SID)]}
    statuses = {"result": [
        _update("c1", "3", epsilon=1.5, train_loss=0.7), _update("c2", "3", epsilon=1.4),
        _update("c1", "4", epsilon=2.5), _failure("c2", "4"),
        {"type": "MODEL_UPDATE", "log_level": "INFO", "status": "Starting", "data": ""},
    ]}
    validations = {"result": [
        _validation("c1", "g1", 0.5, n_val=3), _validation("c2", "g1", 0.1, n_val=1),
        _validation("c1", "g2", 0.6),
        _validation("c1", "model-of-another-session", 0.99),
    ]}
    log = assemble(rounds, MODELS, statuses, validations, SID, SEED, ["c1", "c2"])
    table = pivot(log.records)
    assert log.model_ids == {1: "g1", 2: "g2"}
    assert table[(1, "c1")]["epsilon"] == 1.5 and table[(1, "c1")]["train_loss"] == 0.7
    assert table[(1, "c1")]["train_failed"] == 0.0
    assert table[(2, "c2")]["train_failed"] == 1.0
    assert "epsilon" not in table[(2, "c2")]
    # n_val-weighted: (0.5 * 3 + 0.1 * 1) / 4
    assert table[(1, "global")]["val_dice_mean"] == pytest.approx(0.4)
    assert math.isnan(table[(1, "global")]["val_dice_heart"])
    assert table[(1, "global")]["round_seconds"] == 5.0
    assert table[(2, "global")]["val_dice_mean"] == pytest.approx(0.6)
    assert all(r.value != 0.99 for r in log.records)
    assert {r.round for r in log.records} == {1, 2}
    assert log.failures == [{"round": 2, "client": "c2", "task": "train",
                             "error": "BudgetExceededError: eps 8.1 > 8"}]


def test_silent_client_is_logged_as_failed() -> None:
    rounds = {"result": [_round("7", SID)]}
    statuses = {"result": [_update("c1", "7")]}
    log = assemble(rounds, {"result": [{"model_id": "g1", "parent_model": SEED}]}, statuses,
                   {"result": []}, SID, SEED, ["c1", "c3"])
    table = pivot(log.records)
    assert table[(1, "c3")] == {"train_failed": 1.0}
    assert log.failures[0]["client"] == "c3" and "no update" in log.failures[0]["error"]


def test_empty_answers_give_empty_log() -> None:
    log = assemble({"message": "error"}, {}, None, [], SID, SEED, ["c1"])
    assert log.rounds == [] and log.records == [] and log.failures == []


def _two_rounds_second_failed(statuses: list[dict], aggregated: int, dead: tuple = ()
                              ) -> tuple[dict, object]:
    rounds = {"result": [_round("3", SID),
                         _round("4", SID, status="Failed", aggregated=aggregated)]}
    chain = {"result": [{"model_id": "g1", "parent_model": SEED}]}
    log = assemble(rounds, chain, {"result": statuses}, {"result": []}, SID, SEED,
                   ["c1", "c2"], dead_combiners=dead)
    return pivot(log.records), log


def test_round_without_model_is_failed_even_when_its_updates_arrived() -> None:
    """One of two combiners died: the other aggregated 2 updates, no model was committed."""
    statuses = [_update("c1", "3"), _update("c2", "3"), _update("c1", "4"), _update("c2", "4")]
    table, log = _two_rounds_second_failed(statuses, aggregated=2, dead=("combiner-2",))
    assert table[(1, "global")]["round_failed"] == 0.0
    assert table[(1, "global")]["updates_aggregated"] == 2
    assert table[(2, "global")]["round_failed"] == 1.0
    assert table[(2, "global")]["updates_aggregated"] == 0.0  # none reached a global model
    assert table[(2, "global")]["updates_received"] == 2
    assert log.causes[2].startswith("combiner died (combiner-2)")
    assert {"round": 2, "client": "global", "task": "round",
            "error": log.causes[2]} in log.failures
    assert not [f for f in log.failures if f["client"] != "global"]  # clients not blamed


def test_only_combiner_died_blames_the_combiner_not_the_clients() -> None:
    statuses = [_update("c1", "3"), _update("c2", "3")]
    _, log = _two_rounds_second_failed(statuses, aggregated=0, dead=("combiner-1",))
    assert "combiner died (combiner-1)" in log.causes[2]
    client_failures = [f for f in log.failures if f["client"] != "global"]
    assert client_failures and all("combiner died" in f["error"] for f in client_failures)


def test_failed_round_causes_clients_failed_or_timeout() -> None:
    statuses = [_update("c1", "3"), _update("c2", "3"), _failure("c1", "4"), _failure("c2", "4")]
    _, log = _two_rounds_second_failed(statuses, aggregated=0)
    assert log.causes[2].startswith("clients failed: every client reported a training "
                                    "failure (c1: BudgetExceededError")
    statuses = [_update("c1", "3"), _update("c2", "3"), _failure("c1", "4")]
    _, log = _two_rounds_second_failed(statuses, aggregated=0)
    assert log.causes[2] == ("timeout: no update arrived within the round timeout "
                             "(silent: c2; failed: c1)")


class _FakeLists:
    """fedn 0.33.0's list routes over in-memory rows: newest first, X-Limit/X-Skip, count."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict]] = {"rounds/": [], "models/": [], "statuses/": [],
                                            "validations/": []}
        self.calls = 0

    def request(self, path: str, headers: dict | None = None, params: dict | None = None
                ) -> dict:
        self.calls += 1
        if path.startswith("rounds/") and path != "rounds/":
            rid = path.split("/", 1)[1]
            return next(dict(r) for r in self.rows["rounds/"] if r["round_id"] == rid)
        rows = list(reversed(self.rows[path]))
        limit, skip = int(headers["X-Limit"]), int(headers["X-Skip"])
        return {"count": len(rows), "result": [dict(r) for r in rows[skip:skip + limit]]}


def test_incremental_collection_equals_a_full_read_after_every_poll() -> None:
    """50 rounds arrive bit by bit (rounds before their config, late validations)."""
    from fedseg.orchestration.collect import SessionCollector

    fake = _FakeLists()
    collector = SessionCollector(None, SID, SEED, ["c1", "c2"])
    collector._request = fake.request  # type: ignore[method-assign]
    rows = fake.rows
    n_status = n_val = 0

    def check() -> None:
        before = fake.calls
        log = collector.collect()
        full = assemble(*(list(reversed(rows[k])) for k in rows), SID, SEED, ["c1", "c2"])
        assert log.records == full.records and log.failures == full.failures
        assert log.rounds == full.rounds
        assert fake.calls - before <= 8  # bounded by what is new, not by the rounds done

    parent = SEED
    for k in range(1, 51):
        rid = str(100 + k)
        rows["rounds/"].append({"round_id": rid, "status": "Pending"})  # no config yet
        rows["rounds/"].append({**_round(str(900 + k), OTHER), "round_id": str(900 + k)})
        check()
        rows["rounds/"][-2].update(_round(rid, SID, status="Pending"))
        for client in ("c1", "c2"):
            n_status += 1
            status = (_failure(client, rid) if (k, client) == (7, "c2")
                      else _update(client, rid, epsilon=float(k)))
            rows["statuses/"].append({**status, "status_id": f"s{n_status}"})
        check()
        rows["models/"].append({"model_id": f"g{k}", "parent_model": parent,
                                "committed_at": "Thu, 26 Nov 2026 16:11:05 GMT"})
        parent = f"g{k}"
        rows["rounds/"][-2]["status"] = "Success"
        check()
        rows["rounds/"][-2].update(_round(rid, SID, status="Finished", end="09"))
        if k > 1:  # the previous round's second validation comes late
            n_val += 1
            rows["validations/"].append({**_validation("c2", f"g{k - 1}", 0.5),
                                         "validation_id": f"v{n_val}"})
        n_val += 1
        rows["validations/"].append({**_validation("c1", f"g{k}", 0.4 + k / 100),
                                     "validation_id": f"v{n_val}"})
        check()
    log = collector.collect()
    assert len(log.rounds) == 50 and all(r.model_id for r in log.rounds)
    # Only the last round is still assembled on each poll (waiting for c2's validation).
    assert len(collector._settled) == 49
    assert {(f["round"], f["client"]) for f in log.failures} == {(7, "c2")}
    assert collector.collect(full=True).records == log.records


def test_a_validation_after_its_round_settled_is_in_the_full_read() -> None:
    """Settled rounds are not rebuilt between polls; the last (full) poll has everything."""
    from fedseg.orchestration.collect import SessionCollector

    fake = _FakeLists()
    collector = SessionCollector(None, SID, SEED, ["c1", "c2"], settle_after_s=0.0)
    collector._request = fake.request  # type: ignore[method-assign]
    fake.rows["rounds/"].append(_round("3", SID))
    fake.rows["models/"].append({"model_id": "g1", "parent_model": SEED})
    fake.rows["statuses/"] += [{**_update(c, "3"), "status_id": c} for c in ("c1", "c2")]
    collector.collect()  # final status: starts the settle clock
    assert "val_loss" not in pivot(collector.collect().records)[(1, "c1")]  # settled
    fake.rows["validations/"].append({**_validation("c1", "g1", 0.7), "validation_id": "v"})
    assert "val_dice_mean" not in pivot(collector.collect().records)[(1, "c1")]
    assert pivot(collector.collect(full=True).records)[(1, "c1")]["val_dice_mean"] == 0.7
