"""Numbers from hand-made round logs: means, organs, rounds/seconds to target, AUC."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import make_run

from fedseg.analysis import summary
from fedseg.orchestration.runlog import RoundRecord, write_rounds, write_run_info
from fedseg_clinic.errors import FedsegError

NAN = math.nan



def client_rows(rnd: int, client: str, **metrics: float) -> list[tuple[int, str, str, float]]:
    return [(rnd, client, metric, value) for metric, value in metrics.items()]


# Round 1: both clients; round 2: c2 absent; round 3: no client at all; round 4: both.
# c1 labels the heart only, c2 heart and esophagus; nobody labels the spinal cord.
FED_ROWS = [
    *client_rows(1, "global", round_seconds=10.0),
    *client_rows(1, "c1", val_dice_mean=0.2, n_val=2, epsilon=1.0, train_seconds=5.0,
                 val_dice_heart=0.1, val_dice_esophagus=NAN, val_dice_spinal_cord=NAN),
    *client_rows(1, "c2", val_dice_mean=0.4, n_val=6, epsilon=1.5, train_seconds=7.0,
                 val_dice_heart=0.3, val_dice_esophagus=0.5, val_dice_spinal_cord=NAN),
    *client_rows(2, "global", round_seconds=20.0),
    *client_rows(2, "c1", val_dice_mean=0.5, n_val=2, epsilon=2.0, train_seconds=5.0,
                 val_dice_heart=0.4, val_dice_esophagus=NAN, val_dice_spinal_cord=NAN),
    *client_rows(3, "global", round_seconds=30.0),
    *client_rows(4, "global", round_seconds=40.0),
    *client_rows(4, "c1", val_dice_mean=0.6, n_val=2, epsilon=3.0, train_seconds=5.0,
                 val_dice_heart=0.5, val_dice_esophagus=NAN, val_dice_spinal_cord=NAN,
                 val_hd95_heart=4.0),
    *client_rows(4, "c2", val_dice_mean=0.8, n_val=6, epsilon=2.5, train_seconds=7.0,
                 val_dice_heart=0.7, val_dice_esophagus=0.9, val_dice_spinal_cord=NAN,
                 val_hd95_heart=6.0),
]


@pytest.fixture()
def fed_run(tmp_path: Path) -> summary.RunLog:
    return summary.load_run(make_run(tmp_path / "fed", FED_ROWS))


def test_curves_unweighted_weighted_and_gaps(fed_run: summary.RunLog) -> None:
    assert fed_run.rounds == (1, 2, 3, 4)
    assert fed_run.clients == ("c1", "c2")
    np.testing.assert_allclose(summary.dice_curve(fed_run), [0.3, 0.5, NAN, 0.7])
    # weighted by n_val: (0.2*2 + 0.4*6) / 8 = 0.35; (0.6*2 + 0.8*6) / 8 = 0.75
    np.testing.assert_allclose(summary.dice_curve(fed_run, weighted=True),
                               [0.35, 0.5, NAN, 0.75])


def test_summary_numbers(fed_run: summary.RunLog) -> None:
    entry = summary.summarize_run(fed_run, target=0.5)
    assert entry["final_round"] == 4
    assert entry["final_dice_mean"] == pytest.approx(0.7)
    assert entry["final_dice_mean_weighted"] == pytest.approx(0.75)
    assert (entry["best_dice_mean"], entry["best_round"]) == (pytest.approx(0.7), 4)
    assert entry["best_dice_mean_weighted"] == pytest.approx(0.75)
    # (0.3 + 0.5 + 0.5 carried forward + 0.7) / 4
    assert entry["dice_auc"] == pytest.approx(0.5)
    assert entry["rounds_to_target"] == 2
    assert entry["seconds_to_target"] == pytest.approx(30.0)
    assert entry["final_epsilon"] == {"c1": 3.0, "c2": 2.5}
    assert entry["epsilon"] == 3.0
    assert entry["train_seconds_total"] == pytest.approx(29.0)
    assert entry["round_seconds_total"] == pytest.approx(100.0)
    assert entry["missing_clients"] == {"2": ["c2"], "3": ["c1", "c2"]}


def test_organs_nan_means_not_labelled(fed_run: summary.RunLog) -> None:
    organs = summary.summarize_run(fed_run)["organs"]
    assert list(organs) == ["heart", "spinal_cord", "esophagus"]
    assert organs["heart"]["final_dice"] == pytest.approx(0.6)
    assert organs["heart"]["final_hd95_mm"] == pytest.approx(5.0)
    assert organs["heart"]["labelled_by"] == ["c1", "c2"]
    # only c2 labels the esophagus: its value, not a mean with c1's NaN or a 0
    assert organs["esophagus"]["final_dice"] == pytest.approx(0.9)
    assert organs["esophagus"]["best_round"] == 4
    assert organs["esophagus"]["labelled_by"] == ["c2"]
    assert organs["spinal_cord"] == {"final_dice": None, "best_dice": None, "best_round": None,
                                     "final_hd95_mm": None, "labelled_by": []}


@pytest.mark.parametrize(("target", "rounds", "seconds"), [
    (0.3, 1, 10.0), (0.31, 2, 30.0), (0.5, 2, 30.0), (0.7, 4, 100.0), (0.71, None, None),
])
def test_rounds_and_seconds_to_target(fed_run: summary.RunLog, target: float,
                                      rounds: int | None, seconds: float | None) -> None:
    entry = summary.summarize_run(fed_run, target=target)
    assert entry["rounds_to_target"] == rounds
    assert entry["seconds_to_target"] == (None if seconds is None else pytest.approx(seconds))


@pytest.mark.parametrize(("rounds", "series", "expected"), [
    ([1, 2, 3, 4], [0.2, 0.4, 0.6, 0.8], 0.5),
    ([1, 2, 3], [NAN, 0.6, NAN], 0.4),  # 0 before the first value, then carried forward
    ([1, 2, 3], [0.9, NAN, NAN], 0.9),  # stopped early: the last value stands
    ([0, 1, 2], [0.9, NAN, 0.5], 0.7),  # round 0 is not counted but carries into round 1
    ([1, 2], [NAN, NAN], 0.0),
    ([0], [0.5], None),
])
def test_dice_auc(rounds: list[int], series: list[float], expected: float | None) -> None:
    result = summary.dice_auc(rounds, np.array(series))
    assert result == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(("series", "target", "expected"), [
    ([0.1, 0.5, 0.4], 0.5, 2), ([NAN, 0.6], 0.5, 2), ([0.1, 0.2], 0.5, None), ([], 0.1, None),
])
def test_rounds_to_target(series: list[float], target: float, expected: int | None) -> None:
    rounds = list(range(1, len(series) + 1))
    assert summary.rounds_to_target(rounds, np.array(series), target) == expected


def test_row_means_of_empty_and_nan_rows() -> None:
    values = np.array([[NAN, NAN], [1.0, NAN], [1.0, 3.0]])
    weights = np.array([[1.0, 1.0], [NAN, 2.0], [1.0, 3.0]])
    np.testing.assert_allclose(summary.nanmean_rows(values), [NAN, 1.0, 2.0])
    np.testing.assert_allclose(summary.weighted_mean_rows(values, weights), [NAN, NAN, 2.5])
    assert summary.nanmean_rows(np.zeros((3, 0))).shape == (3,)


def test_seconds_to_target_unknown_when_a_round_lacks_round_seconds(tmp_path: Path) -> None:
    rows = [(1, "c1", "val_dice_mean", 0.2), (2, "c1", "val_dice_mean", 0.9),
            (2, "global", "round_seconds", 5.0)]
    run = summary.load_run(make_run(tmp_path / "r", rows))
    entry = summary.summarize_run(run, target=0.8)
    assert entry["rounds_to_target"] == 2
    assert entry["seconds_to_target"] is None


def test_global_rows_used_when_no_client_has_dice(tmp_path: Path) -> None:
    rows = [(1, "global", "val_dice_mean", 0.4), (2, "global", "val_dice_mean", 0.6),
            (1, "clinic_a", "train_loss", 1.0)]
    run = summary.load_run(make_run(tmp_path / "local", rows, kind="local"))
    assert run.dice_clients == ("global",)
    entry = summary.summarize_run(run)
    assert entry["final_dice_mean"] == pytest.approx(0.6)
    assert entry["final_epsilon"] == {"clinic_a": None}
    assert entry["epsilon"] is None


def test_target_fraction_of_pooled_run(tmp_path: Path, fed_run: summary.RunLog) -> None:
    pooled = summary.load_run(make_run(
        tmp_path / "pooled", [(1, "pooled", "val_dice_mean", 0.6),
                              (2, "pooled", "val_dice_mean", 0.8)], kind="pooled"))
    data = summary.summarize_runs([fed_run, pooled], target_fraction=0.5)
    assert data["target_dice"] == pytest.approx(0.4)
    assert data["runs"][0]["rounds_to_target"] == 2
    assert data["runs"][1]["rounds_to_target"] == 1
    assert "pooled" in data["target_source"]


def test_target_fraction_of_pooled_seeds_is_their_mean(tmp_path: Path,
                                                       fed_run: summary.RunLog) -> None:
    pooled = [summary.load_run(make_run(tmp_path / f"pooled-s{s}",
                                        [(1, "pooled", "val_dice_mean", dice)],
                                        kind="pooled", seed=s,
                                        config={"seed": s, "clinic": {"x": 1}}))
              for s, dice in ((1, 0.6), (2, 0.8))]
    data = summary.summarize_runs([fed_run, *pooled], target_fraction=0.5)
    assert data["target_dice"] == pytest.approx(0.35)
    assert "2 pooled seeds" in data["target_source"]
    other = summary.load_run(make_run(tmp_path / "pooled-other",
                                      [(1, "pooled", "val_dice_mean", 0.9)], kind="pooled",
                                      config={"clinic": {"x": 2}}))
    with pytest.raises(FedsegError, match="exactly one pooled setting"):
        summary.resolve_target([*pooled, other], None, 0.5)


@pytest.mark.parametrize(("dice", "fraction", "message"), [
    (0.5, 0.5, "not both"), (1.5, None, "not in [0, 1]"), (None, 0.0, "not in (0, 1]"),
    (None, 0.9, "exactly one pooled setting"),
])
def test_bad_targets(fed_run: summary.RunLog, dice: float | None, fraction: float | None,
                     message: str) -> None:
    with pytest.raises(FedsegError, match=re.escape(message)):
        summary.resolve_target([fed_run], dice, fraction)


def test_run_epsilon_prefers_config_target(tmp_path: Path) -> None:
    rows = [(1, "c1", "epsilon", 0.7), (1, "c1", "val_dice_mean", 0.5)]
    run = summary.load_run(make_run(tmp_path / "dp", rows,
                                    config={"privacy": {"target_epsilon": 1.0}}))
    assert summary.run_epsilon(run) == 1.0


def test_header_only_log_is_an_error_naming_the_file(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "empty", [])
    with pytest.raises(FedsegError, match=r"empty[/\\]rounds.csv: round log has no rows"):
        summary.load_run(run_dir)


@pytest.mark.parametrize(("csv_text", "message"), [
    ("", "empty round log"),
    ("round,client,metric,value\n1,c1,val_dice_mean\n", "expected 4 fields"),
    ("round,client,metric,value\nx,c1,val_dice_mean,0.5\n", "bad round or value"),
])
def test_malformed_logs(tmp_path: Path, csv_text: str, message: str) -> None:
    run_dir = make_run(tmp_path / "bad", [(1, "c1", "val_dice_mean", 0.5)])
    (run_dir / "rounds.csv").write_text(csv_text)
    with pytest.raises(FedsegError, match=message) as info:
        summary.load_run(run_dir)
    assert "rounds.csv" in str(info.value)


def test_missing_run_json_and_bad_kind(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path / "r", [(1, "c1", "val_dice_mean", 0.5)], kind="solo")
    with pytest.raises(FedsegError, match="kind must be one of"):
        summary.load_run(run_dir)
    (run_dir / "run.json").unlink()
    with pytest.raises(FedsegError, match=r"run\.json: missing"):
        summary.load_run(run_dir)
    with pytest.raises(FedsegError, match="not a folder"):
        summary.load_run(tmp_path / "nowhere")


def test_missing_optional_run_info_keys(tmp_path: Path) -> None:
    run_dir = tmp_path / "bare"
    run_dir.mkdir()
    write_rounds(run_dir, [RoundRecord(1, "c1", "val_dice_mean", 0.5)])
    write_run_info(run_dir, {})
    entry = summary.summarize_run(summary.load_run(run_dir))
    assert (entry["name"], entry["kind"], entry["seed"]) == ("bare", "federated", None)
    assert entry["timings"] == {}


def _seed_run(tmp_path: Path, name: str, seed: int, reach_round: int | None,
              config: dict | None = None) -> summary.RunLog:
    """Two clients; the client mean crosses 0.5 at ``reach_round`` (never when None)."""
    rows: list[tuple[int, str, str, float]] = []
    for rnd in (1, 2, 3, 4):
        dice = 0.6 if reach_round is not None and rnd >= reach_round else 0.2
        rows += client_rows(rnd, "global", round_seconds=10.0 * rnd)
        rows += client_rows(rnd, "c1", val_dice_mean=dice, n_val=2)
        if rnd != 2:  # c2 skips round 2: fewer bytes moved that round
            rows += client_rows(rnd, "c2", val_dice_mean=dice, n_val=2)
    base = {"name": name, "seed": seed, "session": {"rounds": 4},
            "clinic": {"training": {"seed": seed, "local_steps": 5}}}
    run_dir = make_run(tmp_path / name, rows, seed=seed, model_bytes=1000,
                       config=config or base)
    return summary.load_run(run_dir)


def test_seed_groups_mean_and_confidence_interval(tmp_path: Path) -> None:
    runs = [_seed_run(tmp_path, "fedavg-s1", 1, 2), _seed_run(tmp_path, "fedavg-s2", 2, 3),
            _seed_run(tmp_path, "fedavg-s3", 3, None),
            _seed_run(tmp_path, "other", 4, 1, config={"name": "other", "seed": 4,
                                                       "session": {"rounds": 9}})]
    data = summary.summarize_runs(runs, target_dice=0.5)
    assert [e["bytes_to_target"] for e in data["runs"]] == [6000.0, 10000.0, None, 4000.0]
    [group] = data["groups"]  # "other" differs beyond its seed: not a replicate
    assert group["label"] == "fedavg" and group["runs"] == ["fedavg-s1", "fedavg-s2",
                                                              "fedavg-s3"]
    assert group["seeds"] == [1, 2, 3] and group["reached_target"] == 2
    rounds = group["rounds_to_target"]
    # Over the two seeds that reached it: 2 and 3 -> mean 2.5, t(0.975, 1) * sd / sqrt(2).
    assert rounds["n"] == 2 and rounds["mean"] == pytest.approx(2.5)
    assert rounds["ci95"] == pytest.approx(12.7062047 * math.sqrt(0.5) / math.sqrt(2))
    final = group["final_dice_mean"]
    assert final["n"] == 3 and final["mean"] == pytest.approx((0.6 + 0.6 + 0.2) / 3)
    assert group["seconds_to_target"]["mean"] == pytest.approx((30.0 + 60.0) / 2)
    assert summary.mean_ci95([1.0]) == {"n": 1, "mean": 1.0, "ci95": None}
    assert summary.mean_ci95([None]) == {"n": 0, "mean": None, "ci95": None}
