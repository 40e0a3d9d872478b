"""Privacy ledger: composition over rounds, restarts, budget, tamper and deletion detection."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.privacy.accounting import compute_epsilon, compute_epsilon_history
from fedseg_clinic.privacy.ledger import (
    BudgetExceededError,
    LedgerSegment,
    PrivacyLedger,
    data_identity,
    default_anchor_path,
)
from fedseg_clinic.privacy.ledger import (
    ledger_path as ledger_file,
)

DELTA = 1e-3
DATA_ID = data_identity(["p1", "p2", "p3"])


def seg(round_id: str, steps: int = 20, q: float = 0.05, sigma: float = 1.2,
        n: int | None = 100) -> LedgerSegment:
    return LedgerSegment(round_id, steps, q, sigma, 1.0, n)


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    return ledger_file(tmp_path / "data" / ".fedseg-privacy", DATA_ID)


def open_ledger(path: Path, budget: float | None = None, **kwargs) -> PrivacyLedger:
    return PrivacyLedger(path, DATA_ID, DELTA, budget, **kwargs)


def filled(path: Path, rounds: int = 3) -> PrivacyLedger:
    ledger = open_ledger(path)
    for r in range(rounds):
        ledger.record(seg(f"r{r}"))
    return ledger


def test_new_ledger_creates_files_and_spends_nothing(ledger_path: Path) -> None:
    ledger = open_ledger(ledger_path)
    assert ledger_path.exists()
    assert ledger.anchor_path == (ledger_path.parent.parent / ".fedseg-privacy-anchors"
                                  / f"ledger-{DATA_ID}.anchor.json")
    assert default_anchor_path(ledger_path) == ledger.anchor_path
    assert ledger.anchor_path.exists()
    report = ledger.spent()
    assert (report.epsilon, report.steps) == (0.0, 0)
    assert ledger.entries() == []


def test_rounds_compose_and_survive_restart(ledger_path: Path) -> None:
    ledger = open_ledger(ledger_path)
    first = ledger.record(seg("r1", steps=30))
    second = ledger.record(seg("r2", steps=10, q=0.1, sigma=1.5))
    expected = compute_epsilon_history([(0.05, 1.2, 30), (0.1, 1.5, 10)], DELTA)
    assert second.epsilon == pytest.approx(expected.epsilon, rel=1e-12)
    assert second.epsilon > first.epsilon > 0
    reopened = open_ledger(ledger_path)  # a client restart
    assert reopened.spent() == second
    assert [e["round_id"] for e in reopened.entries()] == ["r1", "r2"]
    assert all(len(e["hash"]) == 64 and e["time"] for e in reopened.entries())


def test_equal_rounds_equal_one_schedule(ledger_path: Path) -> None:
    ledger = open_ledger(ledger_path)
    for r in range(3):
        ledger.record(LedgerSegment.for_schedule(f"r{r}", 100, 5, 20, 1.2, 1.0))
    one = compute_epsilon(100, 5, 60, 1.2, DELTA)
    assert ledger.spent().epsilon == pytest.approx(one.epsilon, rel=1e-9)


def test_check_budget_allows_then_refuses(ledger_path: Path) -> None:
    budget = compute_epsilon_history([(0.05, 1.2, 50)], DELTA).epsilon
    ledger = open_ledger(ledger_path, budget=budget)
    ok = ledger.check_budget(seg("r1", steps=40))
    assert ok.epsilon <= budget
    ledger.record(seg("r1", steps=40))
    before = ledger_path.read_bytes()
    with pytest.raises(BudgetExceededError, match=r"round r2 would bring epsilon .* refusing"):
        ledger.check_budget(seg("r2", steps=20))
    assert isinstance(BudgetExceededError("x"), FedsegError)
    assert ledger_path.read_bytes() == before  # a check writes nothing
    assert ledger.check_budget(seg("r2", steps=10)).epsilon <= budget


def test_no_budget_never_refuses_but_reports_inf(ledger_path: Path) -> None:
    ledger = open_ledger(ledger_path, budget=None)
    assert ledger.check_budget(seg("r1", sigma=0.0)).epsilon == float("inf")
    with pytest.raises(BudgetExceededError):
        open_ledger(ledger_path, budget=100.0).check_budget(seg("r1", sigma=0.0))


def test_check_budget_refuses_delta_not_below_one_over_n(ledger_path: Path) -> None:
    with pytest.raises(FedsegError, match="1/N"):
        open_ledger(ledger_path).check_budget(seg("r1", n=1000))  # delta = 1/N


def test_deleted_ledger_is_refused_not_reset(ledger_path: Path) -> None:
    ledger = filled(ledger_path)
    ledger_path.unlink()
    with pytest.raises(FedsegError, match=r"was deleted .*refusing to train"):
        ledger.spent()
    with pytest.raises(FedsegError, match="deleted"):
        open_ledger(ledger_path)
    assert not ledger_path.exists()  # never silently recreated


def test_deleted_state_dir_is_detected(ledger_path: Path) -> None:
    filled(ledger_path, rounds=1)
    for child in ledger_path.parent.iterdir():
        child.unlink()
    ledger_path.parent.rmdir()
    with pytest.raises(FedsegError, match="deleted"):
        open_ledger(ledger_path)


def test_lost_anchor_is_refused(ledger_path: Path) -> None:
    ledger = filled(ledger_path, rounds=1)
    ledger.anchor_path.unlink()
    with pytest.raises(FedsegError, match="lost its anchor"):
        open_ledger(ledger_path)


def _rewrite(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _truncate(data: dict) -> None:
    data["entries"] = data["entries"][:2]  # a valid chain, just shorter


def _edit_noise(data: dict) -> None:
    data["entries"][1]["noise_multiplier"] = 5.0


def _drop_middle(data: dict) -> None:
    del data["entries"][1]


def _swap(data: dict) -> None:
    data["entries"][0], data["entries"][1] = data["entries"][1], data["entries"][0]


def _edit_last_and_rehash(data: dict) -> None:
    import hashlib
    last = data["entries"][-1]
    last["steps"] = 1
    body = {k: v for k, v in last.items() if k != "hash"}
    text = data["entries"][-2]["hash"] + json.dumps(body, sort_keys=True, separators=(",", ":"))
    last["hash"] = hashlib.sha256(text.encode()).hexdigest()


def _empty(data: dict) -> None:
    data["entries"] = []


@pytest.mark.parametrize(("change", "fragment"), [
    (_truncate, "truncated"),
    (_empty, "truncated"),
    (_edit_noise, "entry 1, round 'r1', fails its hash check"),
    (_drop_middle, "fails its hash check"),
    (_swap, "fails its hash check"),
    (_edit_last_and_rehash, "head does not match anchor"),
])
def test_modified_ledger_is_refused(ledger_path: Path, change, fragment: str) -> None:
    filled(ledger_path, rounds=3)
    _rewrite(ledger_path, change)
    with pytest.raises(FedsegError, match=fragment):
        open_ledger(ledger_path)


def test_garbage_ledger_is_refused(ledger_path: Path) -> None:
    filled(ledger_path, rounds=1)
    ledger_path.write_text("{not json")
    with pytest.raises(FedsegError, match=r"unreadable.*refusing to train"):
        open_ledger(ledger_path)


def test_other_data_set_is_refused_and_delta_is_free(ledger_path: Path) -> None:
    filled(ledger_path, rounds=1)
    with pytest.raises(FedsegError, match=f"belongs to data set '{DATA_ID}'"):
        PrivacyLedger(ledger_path, "0123456789abcdef", DELTA, None)
    # The segments compose at any delta: a run at another delta continues the history.
    other = PrivacyLedger(ledger_path, DATA_ID, 1e-4, None)
    assert other.spent().epsilon == pytest.approx(
        compute_epsilon_history([(0.05, 1.2, 20)], 1e-4).epsilon)


def test_interrupted_write_one_entry_ahead_is_accepted(ledger_path: Path, tmp_path: Path
                                                       ) -> None:
    ledger = filled(ledger_path, rounds=2)
    old_anchor = ledger.anchor_path.read_text()
    ledger.record(seg("r2"))
    ledger.anchor_path.write_text(old_anchor)  # as if we crashed before the anchor write
    reopened = open_ledger(ledger_path)
    assert len(reopened.entries()) == 3
    assert json.loads(reopened.anchor_path.read_text())["entries"] == 3


def test_custom_anchor_path(ledger_path: Path, tmp_path: Path) -> None:
    anchor = tmp_path / "elsewhere" / "anchor.json"
    ledger = open_ledger(ledger_path, anchor_path=anchor)
    ledger.record(seg("r0"))
    assert json.loads(anchor.read_text())["entries"] == 1
    assert not default_anchor_path(ledger_path).exists()


@pytest.mark.parametrize("kwargs", [
    {"round_id": ""}, {"steps": -1}, {"steps": 1.5}, {"sampling_probability": 1.5},
    {"noise_multiplier": -0.1}, {"l2_norm_clip": 0.0}, {"n_patients": 0},
])
def test_segment_refuses_bad_values(kwargs: dict) -> None:
    args = {"round_id": "r", "steps": 1, "sampling_probability": 0.1,
            "noise_multiplier": 1.0, "l2_norm_clip": 1.0, "n_patients": 10, **kwargs}
    with pytest.raises(FedsegError, match="ledger segment"):
        LedgerSegment(**args)


@pytest.mark.parametrize(("delta", "budget"), [(0.0, None), (1.0, None), (1e-3, 0.0)])
def test_ledger_refuses_bad_settings(ledger_path: Path, delta: float, budget: float | None
                                     ) -> None:
    with pytest.raises(FedsegError):
        PrivacyLedger(ledger_path, "clinic-a", delta, budget)
    assert not ledger_path.exists()


# -- version 2: the data set's ledger, locked, reserved before training, reset --------

def test_privacy_folder_and_files_are_private(ledger_path: Path) -> None:
    ledger = filled(ledger_path, rounds=1)
    assert ledger_path.parent.stat().st_mode & 0o777 == 0o700
    assert ledger.anchor_path.parent.stat().st_mode & 0o777 == 0o700
    for path in (ledger_path, ledger.anchor_path, ledger_path.parent / ".lock"):
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_data_identity_is_the_set_of_patients() -> None:
    assert data_identity(["b", "a", "a"]) == data_identity(["a", "b"])
    assert data_identity(["a", "b"]) != data_identity(["a", "b", "c"])
    with pytest.raises(FedsegError, match="no training patients"):
        data_identity([])


def test_reserve_records_before_training_and_refuses_beyond_budget(ledger_path: Path
                                                                   ) -> None:
    budget = compute_epsilon_history([(0.05, 1.2, 50)], DELTA).epsilon
    ledger = open_ledger(ledger_path, budget=budget)
    report = ledger.reserve(seg("r1", steps=40), client="clinic-a", run="run-1")
    assert [e["round_id"] for e in ledger.entries()] == ["r1"]  # recorded at once
    assert ledger.spent() == report
    entry = ledger.entries()[0]
    assert (entry["client"], entry["run"], entry["delta"]) == ("clinic-a", "run-1", DELTA)
    before = ledger_path.read_bytes()
    with pytest.raises(BudgetExceededError, match="refusing to train"):
        ledger.reserve(seg("r2", steps=20))
    assert ledger_path.read_bytes() == before  # a refused round writes nothing


def test_changed_training_set_composes_with_the_earlier_one(ledger_path: Path) -> None:
    filled(ledger_path, rounds=2)
    grown_id = data_identity(["p1", "p2", "p3", "p4"])  # a patient was added
    grown = PrivacyLedger(ledger_file(ledger_path.parent, grown_id), grown_id, DELTA, None)
    assert grown.entries() == []
    both = compute_epsilon_history([(0.05, 1.2, 20)] * 3, DELTA).epsilon
    assert grown.record(seg("r3")).epsilon == pytest.approx(both, rel=1e-9)


def test_reset_archives_and_logs(ledger_path: Path) -> None:
    from fedseg_clinic.privacy.ledger import describe_privacy_dir, reset_ledgers

    filled(ledger_path, rounds=2)
    shown = describe_privacy_dir(ledger_path.parent, DELTA)
    assert shown["ledgers"][0]["rounds"] == 2 and shown["epsilon_all"] > 0
    with pytest.raises(FedsegError, match="reason"):
        reset_ledgers(ledger_path.parent, "  ")
    record = reset_ledgers(ledger_path.parent, "new IRB protocol 42", delta=DELTA)
    assert record["ledgers"][0]["rounds"] == 2
    assert not ledger_path.exists()
    assert (Path(record["archive"]) / ledger_path.name).exists()
    fresh = open_ledger(ledger_path)  # starts over, and the reset is on record
    assert fresh.spent().epsilon == 0.0
    assert describe_privacy_dir(ledger_path.parent, DELTA)["resets"][0]["reason"] == (
        "new IRB protocol 42")


def test_reset_after_a_deleted_ledger(ledger_path: Path) -> None:
    """A deleted ledger refuses training; the logged reset is the way out."""
    from fedseg_clinic.privacy.ledger import reset_ledgers

    filled(ledger_path, rounds=1)
    ledger_path.unlink()
    with pytest.raises(FedsegError, match="was deleted"):
        open_ledger(ledger_path)
    record = reset_ledgers(ledger_path.parent, "ledger deleted by mistake", delta=DELTA)
    assert "deleted" in record["ledgers"][0]["broken"]
    assert open_ledger(ledger_path).spent().epsilon == 0.0


def _reserve_worker(path: str, budget: float | None, rounds: int, tag: str,
                    out: Any) -> None:
    """One process reserving ``rounds`` segments; reports (granted, refused, errors)."""
    granted = refused = 0
    errors: list[str] = []
    for r in range(rounds):
        try:
            PrivacyLedger(Path(path), DATA_ID, DELTA, budget).reserve(
                seg(f"{tag}-{r}", steps=5), client=tag)
            granted += 1
        except BudgetExceededError:
            refused += 1
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            errors.append(f"{type(exc).__name__}: {exc}")
    out.put((tag, granted, refused, errors))


def _run_workers(path: Path, budget: float | None, processes: int, rounds: int
                 ) -> list[tuple[str, int, int, list[str]]]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # real, independent processes
    queue = ctx.Queue()
    workers = [ctx.Process(target=_reserve_worker, args=(str(path), budget, rounds,
                                                         f"w{i}", queue))
               for i in range(processes)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=300) for _ in workers]
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    return results


@pytest.mark.slow
def test_concurrent_processes_lose_no_entry(ledger_path: Path) -> None:
    open_ledger(ledger_path)
    results = _run_workers(ledger_path, None, processes=4, rounds=20)
    assert [r[3] for r in results] == [[], [], [], []]  # no false "head does not match"
    entries = open_ledger(ledger_path).entries()
    assert len(entries) == 80
    assert sorted(e["round_id"] for e in entries) == sorted(
        f"w{i}-{r}" for i in range(4) for r in range(20))


@pytest.mark.slow
def test_concurrent_trainings_cannot_overspend(ledger_path: Path) -> None:
    budget = compute_epsilon_history([(0.05, 1.2, 5 * 12)], DELTA).epsilon * 1.0001
    open_ledger(ledger_path)
    results = _run_workers(ledger_path, budget, processes=4, rounds=6)
    assert [r[3] for r in results] == [[], [], [], []]
    granted = sum(r[1] for r in results)
    assert granted == 12  # exactly what fits, whoever won the races
    assert sum(r[2] for r in results) == 24 - 12
    assert len(open_ledger(ledger_path).entries()) == 12
    assert open_ledger(ledger_path).spent().epsilon <= budget
