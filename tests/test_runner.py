"""runner.py pieces that need no network: the progress line, the demo experiment."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedseg.orchestration.collect import RoundInfo
from fedseg.orchestration.runlog import RoundRecord
from fedseg.orchestration.runner import RoundReporter, demo_experiment, write_clinic_settings


class _Log:
    def __init__(self, records: list[RoundRecord], causes: dict[int, str] | None = None
                 ) -> None:
        self.records = records
        self.causes = causes or {}


def test_progress_line_names_failed_clients(tmp_path: Path) -> None:
    reporter = RoundReporter(None, "s", "seed", ["c1", "c2", "c3"], 5, tmp_path, True, None)
    info = RoundInfo(2, "7", "Finished", "m", 12.0, 1.0, 0.1, 3, 2)
    log = _Log([RoundRecord(2, "c1", "val_dice_mean", 0.4123), RoundRecord(2, "c1", "epsilon", 1.2),
                RoundRecord(2, "c1", "train_failed", 0.0),
                RoundRecord(2, "c2", "val_dice_mean", math.nan),
                RoundRecord(2, "c2", "train_failed", 0.0),
                RoundRecord(2, "c3", "train_failed", 1.0),
                RoundRecord(1, "c3", "val_dice_mean", 0.9)])
    assert reporter.round_line(info, log) == (
        "round 2/5  c1 dice 0.41 eps 1.20  c2 dice -  c3 FAILED  12.0 s")


def test_progress_line_says_a_round_without_model_failed(tmp_path: Path) -> None:
    reporter = RoundReporter(None, "s", "seed", ["c1"], 3, tmp_path, True, None)
    info = RoundInfo(2, "7", "Failed", "", 9.0, 1.0, 0.1, 1, 1)
    log = _Log([RoundRecord(2, "c1", "train_failed", 0.0)],
               {2: "combiner died (combiner-1): no global model committed"})
    assert reporter.round_line(info, log).startswith(
        "round 2/3  FAILED, no model: combiner died (combiner-1)")


def test_demo_experiment_is_valid_and_uses_free_ports() -> None:
    first, second = demo_experiment(rounds=4), demo_experiment()
    assert first.session.rounds == 4 and second.session.rounds == 3
    assert first.data.clinic_names() == ["clinic-1", "clinic-2", "clinic-3"]
    assert first.clinic["privacy"]["enabled"] is True
    # The DP recipe: epsilon <= 8 over exactly the session's rounds, from the shipped seed.
    assert first.clinic["privacy"]["target_epsilon"] == 8.0
    assert first.clinic["privacy"]["planned_rounds"] == 4
    assert first.clinic["training"]["trainable"] == "norm_bias"
    assert first.seed_weights is not None and first.seed_weights.name == "demo-seed.npz"
    assert first.network["api_port"] != first.network["s3_port"]


def test_a_second_demo_gets_a_fresh_run_folder(tmp_path: Path) -> None:
    from fedseg.commands.run import demo_run_name

    assert demo_run_name(tmp_path, overwrite=False) == "demo"
    (tmp_path / "demo").mkdir()
    assert demo_run_name(tmp_path, overwrite=False) == "demo"  # empty: reuse
    (tmp_path / "demo" / "run.json").write_text("{}")
    second = demo_run_name(tmp_path, overwrite=False)
    assert second.startswith("demo-") and second != "demo"
    assert demo_run_name(tmp_path, overwrite=True) == "demo"


def test_clinic_settings_file_carries_model_and_seed(tmp_path: Path) -> None:
    import yaml

    exp = demo_experiment()
    path = write_clinic_settings(exp, tmp_path, "clinic-2", 1)
    data = yaml.safe_load(path.read_text())
    assert data["model"] == exp.model
    assert data["training"]["seed"] == exp.seed + 1
    assert data["privacy"] == exp.clinic["privacy"]


class _Collector:
    def __init__(self, log: object) -> None:
        self.log = log

    def collect(self, *args: object, **kwargs: object) -> object:
        return self.log


def _serve(reporter: RoundReporter, log: object) -> None:
    """The reporter collects ``log`` (no API) and has no budget refusals to act on."""
    reporter.collector = _Collector(log)  # type: ignore[assignment]
    reporter._end_on_budget_refusal = lambda own: None  # type: ignore[method-assign]


def test_a_done_round_waits_validation_grace_for_its_validations(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Real CT validates for minutes: with the old fixed 120 s every OpenKBP round was
    # written without Dice. The grace is now the experiment's session.validation_timeout.
    from fedseg.orchestration import collect, runner, session

    clock = [1000.0]
    records = [RoundRecord(1, "c1", "num_examples", 10.0)]
    log = collect.SessionLog([RoundInfo(1, "7", "Finished", "m", 5.0, 1.0, 0.1, 1, 1)],
                             records, [], {})
    monkeypatch.setattr(session, "download_model", lambda *a, **k: None)
    monkeypatch.setattr(runner.time, "monotonic", lambda: clock[0])
    reporter = RoundReporter(None, "s", "seed", ["c1"], 2, tmp_path, True, None,
                             validation_grace_s=300.0)
    _serve(reporter, log)
    reporter.poll()
    clock[0] += 200.0  # past the old fixed 120 s, within this experiment's 300 s
    reporter.poll()
    assert reporter.reported == set()
    records.append(RoundRecord(1, "c1", "val_dice_mean", 0.5))
    reporter.poll()
    assert reporter.reported == {1}
    assert "0.5" in (tmp_path / "rounds.csv").read_text()


def test_a_round_without_validations_is_written_after_the_grace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fedseg.orchestration import collect, runner, session

    clock = [0.0]
    log = collect.SessionLog([RoundInfo(1, "7", "Finished", "m", 5.0, 1.0, 0.1, 1, 1)],
                             [RoundRecord(1, "c1", "num_examples", 10.0)], [], {})
    monkeypatch.setattr(session, "download_model", lambda *a, **k: None)
    monkeypatch.setattr(runner.time, "monotonic", lambda: clock[0])
    reporter = RoundReporter(None, "s", "seed", ["c1"], 2, tmp_path, True, None,
                             validation_grace_s=30.0)
    _serve(reporter, log)
    reporter.poll()
    clock[0] = 31.0
    reporter.poll()
    assert reporter.reported == {1}


def test_the_collector_settles_rounds_after_the_same_grace(tmp_path: Path) -> None:
    # A collector that froze a round's rows after 120 s would drop validations that the
    # reporter (validation_timeout 900) still waits for.
    reporter = RoundReporter(None, "s", "seed", ["c1"], 2, tmp_path, True, None,
                             validation_grace_s=900.0)
    assert reporter.collector.settle_after_s == 900.0
