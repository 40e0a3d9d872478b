"""Sweeps: grid expansion, per-point experiments, noise calibration, resume, bad files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from fedseg.analysis.summary import load_run, run_epsilon
from fedseg.orchestration.runlog import RoundRecord, write_rounds, write_run_info
from fedseg.orchestration.sweep import (
    expand_grid,
    load_sweep,
    plan_noise,
    plan_runs,
    point_experiment,
    run_sweep,
)
from fedseg_clinic.cases import FORMAT_VERSION, Manifest, ManifestEntry, write_manifest
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.privacy.accounting import calibrate_noise, compute_epsilon

ROUNDS = 2
STEPS = 3


def _clinic(folder: Path, n_train: int, n_val: int = 1) -> Path:
    """A clinic folder with only a manifest (enough for planning; the runs are faked)."""
    folder.mkdir(parents=True)
    entries = [ManifestEntry(f"p{i}", "train" if i < n_train else "val", ("heart",),
                             (8, 8, 8)) for i in range(n_train + n_val)]
    write_manifest(Manifest(clinic=folder.name, cases=entries), folder)
    return folder


def _base(tmp_path: Path, **extra: Any) -> Path:
    _clinic(tmp_path / "cases" / "a", n_train=3)
    _clinic(tmp_path / "cases" / "b", n_train=6)
    doc: dict[str, Any] = {
        "name": "base", "seed": 1,
        "data": {"clinics": {"a": "cases/a", "b": "cases/b"}},
        "model": {"levels": 2, "base_filters": 4, "groups": 2},
        "clinic": {"training": {"local_steps": STEPS, "batch_size": 2,
                                "patch_size": [16, 16, 16]},
                   "privacy": {"noise_multiplier": 1.0}},
        "session": {"rounds": ROUNDS},
    }
    doc.update(extra)
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _sweep(tmp_path: Path, grid: dict[str, Any], **extra: Any) -> Path:
    if not (tmp_path / "base.yaml").exists():
        _base(tmp_path)
    doc = {"name": "sw", "base": "base.yaml", "grid": grid, **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(("grid", "names"), [
    ({"aggregator": ["fedavg", "fedopt"], "server_learning_rate": [0.1, 0.01]},
     ["fedavg", "fedopt-slr0.1", "fedopt-slr0.01"]),
    ({"local_steps": [2, 3], "target_epsilon": [1, ".inf"]},
     ["eps1-ls2", "eps1-ls3", "epsinf-ls2", "epsinf-ls3"]),
    ({"learning_rate": 0.003}, ["lr0.003"]),
    ({"server_learning_rate": [0.1, 0.2]}, [""]),  # base aggregates with fedavg: dropped
    ({"aggregator": ["fedavgm"], "server_learning_rate": [1.0], "seed": [1, 2]},
     ["fedavgm-slr1-s1", "fedavgm-slr1-s2"]),
])
def test_expand_grid(tmp_path: Path, grid: dict[str, Any], names: list[str]) -> None:
    from fedseg.orchestration.sweep import point_name

    sweep = load_sweep(_sweep(tmp_path, grid))
    assert [point_name(p) for p in expand_grid(sweep)] == names


def test_point_experiment_applies_values(tmp_path: Path) -> None:
    _base(tmp_path, client_settings={"learning_rate": [0.01, 0.02]})
    sweep = load_sweep(_sweep(tmp_path, {"aggregator": ["fedopt"], "learning_rate": [0.005],
                                         "local_steps": [4], "server_learning_rate": [0.1]}))
    run = point_experiment(sweep, expand_grid(sweep)[0], None, None)
    exp = run.experiment
    assert run.name == exp.name == "fedopt-ls4-lr0.005-slr0.1"
    assert exp.session.aggregator == "fedopt"
    assert exp.session.aggregator_kwargs == {"learning_rate": 0.1}
    assert exp.client_settings["learning_rate"] == 0.005  # the schedule is replaced
    assert exp.clinic["training"]["local_steps"] == 4
    assert exp.data.clinic_dirs["a"] == (tmp_path / "cases" / "a").resolve()
    assert exp.raw["sweep"]["params"]["server_learning_rate"] == 0.1
    assert exp.ledgers == "data"  # existing clinic folders: the data's own ledgers


def test_seed_axis_sets_the_seed_and_analyze_groups_the_seeds(tmp_path: Path) -> None:
    from fedseg.analysis.summary import setting_key

    sweep = load_sweep(_sweep(tmp_path, {"aggregator": ["fedavgm"],
                                         "server_learning_rate": [0.5], "seed": [4, 5]}))
    runs = [point_experiment(sweep, p, None, None) for p in expand_grid(sweep)]
    assert [r.experiment.seed for r in runs] == [4, 5]
    assert runs[0].experiment.session.aggregator_kwargs == {"learning_rate": 0.5}
    keys = []
    for run in runs:
        folder = tmp_path / "runs" / run.name
        write_run_info(folder, {"name": run.name, "kind": "federated", "status": "finished",
                                "seed": run.experiment.seed, "config": run.experiment.raw})
        write_rounds(folder, [RoundRecord(1, "a", "val_dice_mean", 0.5)])
        keys.append(setting_key(load_run(folder)))
    assert keys[0] == keys[1]  # seeds of one point: one setting
    with pytest.raises(FedsegError, match=r"grid\.seed: must be integers >= 0"):
        load_sweep(_sweep(tmp_path, {"seed": [1.5]}))


def test_points_on_shared_phantoms_keep_their_own_ledgers(tmp_path: Path) -> None:
    _base(tmp_path, data={"phantoms": {"preset": "iid", "clinics": 2}})
    sweep = load_sweep(_sweep(tmp_path, {"local_steps": [4, 8]}))
    shared = {"clinic-1": tmp_path / "d1", "clinic-2": tmp_path / "d2"}
    exps = [point_experiment(sweep, p, shared, None).experiment for p in expand_grid(sweep)]
    # Otherwise the shared phantoms' ledger would compose every point's epsilon.
    assert [e.ledgers for e in exps] == ["run", "run"]


@pytest.mark.slow  # each calibration takes seconds
def test_plan_noise_meets_target_at_every_clinic(tmp_path: Path) -> None:
    target = 3.0
    sweep = load_sweep(_sweep(tmp_path, {"target_epsilon": [target]}))
    cache: dict[tuple[Any, ...], float] = {}
    sigma = plan_noise(sweep.base, {"a": 3, "b": 6, "c": 3}, target, cache)
    assert len(cache) == 2  # clinics a and c share one calibration
    steps = ROUNDS * STEPS
    # The smallest clinic (largest q) needs the most noise.
    assert sigma == pytest.approx(calibrate_noise(3, 2, steps, target, 1 / 30))
    for n in (3, 6):
        assert compute_epsilon(n, 2, steps, sigma, 1 / (10 * n)).epsilon <= target + 1e-9


@pytest.mark.slow  # noise calibration takes seconds per clinic size
def test_target_epsilon_in_config(tmp_path: Path) -> None:
    sweep = load_sweep(_sweep(tmp_path, {"target_epsilon": [3, "inf"]}))
    runs = plan_runs(sweep, None)
    dp, no_dp = runs
    assert dp.experiment.clinic["privacy"]["enabled"] is True
    assert dp.experiment.clinic["privacy"]["noise_multiplier"] == dp.noise_multiplier > 0
    assert dp.experiment.raw["sweep"]["target_epsilon"] == 3.0
    assert no_dp.experiment.clinic["privacy"]["enabled"] is False
    assert no_dp.noise_multiplier is None
    assert math.isinf(no_dp.experiment.raw["sweep"]["target_epsilon"])


class FakeRunner:
    """Stands in for run_experiment / run_baseline: writes a finished run folder."""

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.calls: list[str] = []
        self.fail = fail

    def _write(self, name: str, kind: str, exp: Any, runs_dir: Path) -> Any:
        self.calls.append(name)
        if name in self.fail:
            raise FedsegError(f"{name}: boom")
        run_dir = runs_dir / name
        run_dir.mkdir(parents=True, exist_ok=True)
        write_rounds(run_dir, [RoundRecord(1, "a", "val_dice_mean", 0.5),
                               RoundRecord(1, "a", "epsilon", 2.5)])
        write_run_info(run_dir, {"name": name, "kind": kind, "status": "finished",
                                 "config": exp.raw})
        return type("Result", (), {"status": "finished"})()

    def federated(self, exp: Any, runs_dir: Path, *, progress: Any, overwrite: bool) -> Any:
        assert overwrite
        return self._write(exp.name, "federated", exp, runs_dir)

    def baseline(self, exp: Any, kind: str, runs_dir: Path, *, progress: Any,
                 overwrite: bool) -> Any:
        return self._write(f"{exp.name}-{kind}", kind, exp, runs_dir)


@pytest.mark.slow  # noise calibration takes seconds per clinic size
def test_run_sweep_resumes_and_indexes(tmp_path: Path) -> None:
    sweep = load_sweep(_sweep(tmp_path, {"target_epsilon": [3, "inf"],
                                         "aggregator": ["fedavg", "fedopt"]},
                              baselines=["pooled"]))
    runs_dir = tmp_path / "runs"
    first = FakeRunner(fail=("epsinf-fedopt",))
    result = run_sweep(sweep, runs_dir, run_federated=first.federated,
                       run_baseline=first.baseline)
    # Baselines do not depend on the aggregator: one per target epsilon.
    assert first.calls == ["eps3-fedavg", "eps3-fedopt", "epsinf-fedavg", "epsinf-fedopt",
                           "eps3-pooled", "epsinf-pooled"]
    assert result.failed == ["epsinf-fedopt"]
    index = json.loads((runs_dir / "sw" / "sweep.json").read_text())
    status = {r["name"]: r["status"] for r in index["runs"]}
    assert status["eps3-fedavg"] == "finished"
    assert status["epsinf-fedopt"] == "failed: epsinf-fedopt: boom"
    assert index["grid"]["target_epsilon"] == [3.0, "inf"] or \
        math.isinf(index["grid"]["target_epsilon"][1])
    # Again: only the failed run is redone.
    second = FakeRunner()
    again = run_sweep(sweep, runs_dir, run_federated=second.federated,
                      run_baseline=second.baseline)
    assert second.calls == ["epsinf-fedopt"]
    assert again.failed == [] and again.statuses["eps3-fedavg"] == "skipped"
    # The analysis finds the sweep's target epsilon in run.json config.
    assert run_epsilon(load_run(runs_dir / "sw" / "eps3-fedavg")) == 3.0
    assert run_epsilon(load_run(runs_dir / "sw" / "epsinf-fedavg")) is None
    # The pooled baseline's epsilon is its own (the fake logged 2.5), not the clinics' target.
    pooled_config = json.loads((runs_dir / "sw" / "eps3-pooled" / "run.json").read_text())
    assert pooled_config["config"]["sweep"]["clinic_target_epsilon"] == 3.0
    assert run_epsilon(load_run(runs_dir / "sw" / "eps3-pooled")) == 2.5


def test_dry_run_plans_only(tmp_path: Path) -> None:
    sweep = load_sweep(_sweep(tmp_path, {"local_steps": [1, 2]}))
    runner = FakeRunner()
    result = run_sweep(sweep, tmp_path / "runs", run_federated=runner.federated,
                       run_baseline=runner.baseline, dry_run=True)
    assert runner.calls == [] and set(result.statuses.values()) == {"planned"}


@pytest.mark.parametrize(("doc", "message"), [
    ("[1, 2]", "must be a YAML mapping"),
    ("name: sw\nbase: base.yaml\ngrid: {local_steps: [1]}\nextra: 1", "extra: unknown key"),
    ("name: 'bad name'\nbase: base.yaml\ngrid: {local_steps: [1]}", "name:"),
    ("name: sw\ngrid: {local_steps: [1]}", "base:"),
    ("name: sw\nbase: nothere.yaml\ngrid: {local_steps: [1]}",
     r"base: experiment file .*nothere\.yaml not found"),
    ("name: sw\nbase: base.yaml\ngrid: {}", "grid: must be a mapping"),
    ("name: sw\nbase: base.yaml\ngrid: {rounds: [1]}", "grid.rounds: unknown axis"),
    ("name: sw\nbase: base.yaml\ngrid: {local_steps: [0]}", "grid.local_steps"),
    ("name: sw\nbase: base.yaml\ngrid: {local_steps: []}", "needs at least one value"),
    ("name: sw\nbase: base.yaml\ngrid: {target_epsilon: [-1]}", "grid.target_epsilon"),
    ("name: sw\nbase: base.yaml\ngrid: {aggregator: [fedsgd]}", "grid.aggregator"),
    ("name: sw\nbase: base.yaml\ngrid: {learning_rate: [0]}", "grid.learning_rate"),
    ("name: sw\nbase: base.yaml\ngrid: {local_steps: [1]}\nbaselines: [central]", "baselines"),
    ("name: sw\nbase: base.yaml\ngrid: {local_steps: [1]\n", "not valid YAML"),
    ("name: sw\nbase: base.yaml\ngrid: {seed: [-1]}", "grid.seed"),
    ("name: sw\nbase: base.yaml\ngrid: {variant: [a]}", "grid.variant: 'a' is not in variants"),
    ("name: sw\nbase: base.yaml\nvariants: {a: 3}\ngrid: {variant: [a]}", "variants:"),
])
def test_bad_sweep_files(tmp_path: Path, doc: str, message: str) -> None:
    _base(tmp_path)
    path = tmp_path / "sweep.yaml"
    path.write_text(doc)
    with pytest.raises(FedsegError, match=message) as info:
        load_sweep(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_calibration_conflicts_with_noise_schedule(tmp_path: Path) -> None:
    _base(tmp_path, client_settings={"noise_multiplier": 1.5})
    with pytest.raises(FedsegError, match=r"client_settings\.noise_multiplier"):
        load_sweep(_sweep(tmp_path, {"target_epsilon": [1]}))


def test_cli_bad_sweep_one_line(tmp_path: Path) -> None:
    from fedseg.cli import cli

    path = _sweep(tmp_path, {"local_steps": ["many"]})
    result = CliRunner().invoke(cli, ["sweep", str(path), "--runs-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and "grid.local_steps" in result.output


@pytest.mark.slow  # noise calibration takes seconds per clinic size
def test_cli_dry_run_lists_runs(tmp_path: Path) -> None:
    from fedseg.cli import cli

    path = _sweep(tmp_path, {"target_epsilon": [3], "learning_rate": [0.01, 0.02]},
                  baselines=["local"])
    result = CliRunner().invoke(cli, ["sweep", str(path), "--runs-dir", str(tmp_path / "r"),
                                      "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "[1/4] eps3-lr0.01 (federated, sigma" in result.output
    assert "[4/4] eps3-lr0.02-local (local, sigma" in result.output


@pytest.mark.slow
def test_real_tiny_sweep_through_fedn(tmp_path: Path) -> None:
    """One point through the real runner (FEDn processes, the numpy toy clinic app)."""
    import os

    from fedseg.orchestration.network.ports import free_port

    tests = Path(__file__).resolve().parent
    for client in ("c1", "c2"):
        (tmp_path / client).mkdir()
        (tmp_path / client / "manifest.json").write_text(json.dumps(  # valid, empty
            {"clinic": client, "cases": [], "format_version": FORMAT_VERSION}))
    doc = {
        "name": "toy", "seed": 3, "data": {"clinics": {"c1": "c1", "c2": "c2"}},
        "seed_builder": "toy_clinic_app:build_seed",
        "session": {"rounds": 2, "round_timeout": 20, "min_clients": 2},
        "clients": {"app": "toy_clinic_app:ToyApp.from_environment",
                    "env": {"PYTHONPATH": os.pathsep.join(
                        [str(tests), os.environ.get("PYTHONPATH", "")])}},
        "network": {"api_port": free_port(), "s3_port": free_port(),
                    "combiners": [{"name": "combiner-1", "port": free_port()}]},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(doc))
    sweep = load_sweep(_sweep(tmp_path, {"local_steps": [2]}))
    lines: list[str] = []
    result = run_sweep(sweep, tmp_path / "runs", progress=lines.append)
    assert result.statuses == {"ls2": "finished"}, lines
    run_dir = tmp_path / "runs" / "sw" / "ls2"
    summary = load_run(run_dir)
    assert summary.clients == ("c1", "c2") and summary.rounds == (1, 2)
    assert any(line.startswith("round 2/2") for line in lines)
    again = run_sweep(sweep, tmp_path / "runs")
    assert again.statuses == {"ls2": "skipped"}


def test_shipped_sweep_example_loads(repo_root: Path) -> None:
    sweep = load_sweep(repo_root / "experiments" / "sweeps" / "sweep-epsilon.yaml")
    assert sweep.base.name == "fedavg-dp-budget" and sweep.baselines == ("pooled", "local")
    assert len(expand_grid(sweep)) == 4


def test_shipped_study_sweep_loads(repo_root: Path) -> None:
    sweep = load_sweep(repo_root / "experiments" / "sweeps" / "study-dp-rounds.yaml")
    assert sweep.base.name == "noniid-dp" and sweep.baselines == ("pooled", "local")
    assert [p["target_epsilon"] for p in expand_grid(sweep)] == [2, 8, float("inf")]


def test_shipped_rounds_sweep_loads(repo_root: Path) -> None:
    sweep = load_sweep(repo_root / "experiments" / "sweeps" / "study-rounds.yaml")
    points = expand_grid(sweep)
    assert len(points) == 6
    # server_learning_rate applies to the fedopt points only.
    assert all(("server_learning_rate" in p) == (p["aggregator"] == "fedopt") for p in points)


def test_variant_and_seed_axes(tmp_path: Path) -> None:
    _base(tmp_path, clinic={"training": {"local_steps": STEPS, "batch_size": 2,
                                         "patch_size": [16, 16, 16], "trainable": "norm_bias"},
                            "privacy": {"enabled": True, "target_epsilon": 8.0}})
    sweep = load_sweep(_sweep(
        tmp_path, {"seed": [1, 2], "variant": ["base", "all"], "target_epsilon": [8, 2, "inf"]},
        variants={"base": {}, "all": {"clinic": {"training": {"trainable": "all"}},
                                      "session": None}}))
    points = expand_grid(sweep)
    names = [point_experiment(sweep, p, None, {"a": 3, "b": 6}).name for p in points]
    # Seeds vary slowest: every setting once before any is repeated.
    assert names[:6] == ["base-eps8-s1", "base-eps2-s1", "base-epsinf-s1", "all-eps8-s1",
                         "all-eps2-s1", "all-epsinf-s1"]
    assert names[6] == "base-eps8-s2" and len(names) == 12
    runs = {n: point_experiment(sweep, p, None, {"a": 3, "b": 6})
            for n, p in zip(names, points, strict=True)}
    base2 = runs["base-eps2-s2"].experiment
    assert base2.seed == 2 and base2.clinic["training"]["trainable"] == "norm_bias"
    # A base with privacy.target_epsilon: each clinic calibrates its own noise.
    assert base2.clinic["privacy"]["target_epsilon"] == 2.0
    assert "noise_multiplier" not in base2.clinic["privacy"]
    assert runs["base-eps2-s2"].noise_multiplier is None
    assert base2.raw["sweep"]["target_epsilon"] == 2.0
    nodp = runs["base-epsinf-s1"].experiment.clinic["privacy"]
    assert nodp["enabled"] is False and "target_epsilon" not in nodp
    everything = runs["all-eps8-s1"].experiment
    assert everything.clinic["training"]["trainable"] == "all"
    assert base2.session.rounds == ROUNDS
    assert everything.session.rounds != ROUNDS  # "session: null" removed the base's section


def test_shipped_dp_study_sweeps_load(repo_root: Path) -> None:
    sweeps = repo_root / "experiments" / "sweeps"
    curve = load_sweep(sweeps / "dp-study-curve.yaml")
    points = expand_grid(curve)
    assert len(points) == 15 and {p["seed"] for p in points} == {1, 2, 3}
    assert [p["target_epsilon"] for p in points[:5]] == [8, 1, math.inf, 2, 4]
    assert curve.base.seed_weights is not None and curve.base.seed_weights.is_file()
    ablations = load_sweep(sweeps / "dp-study-ablations.yaml")
    ablation_points = expand_grid(ablations)
    assert [p["variant"] for p in ablation_points[:4]] == ["no-seed", "all-params", "k4", "ema"]
    assert len(ablation_points) == 12 and {p["seed"] for p in ablation_points} == {1, 2, 3}
    nodp = load_sweep(sweeps / "dp-study-nodp.yaml")
    nodp_points = expand_grid(nodp)
    assert [p["target_epsilon"] for p in nodp_points] == [math.inf] * 6
    assert [p["seed"] for p in nodp_points] == [1, 1, 2, 2, 3, 3]
    # "From scratch" must mean a random seed model: a removed seed_weights key would now
    # fall back to the shipped pretrained seed (the default when the model matches).
    for sweep, variant in ((nodp, "fedavg-scratch"), (ablations, "no-seed")):
        point = next(p for p in expand_grid(sweep) if p["variant"] == variant)
        exp = point_experiment(sweep, point, None, None, {}).experiment
        assert exp.seed_weights is None and not exp.pretrained_default, variant
    seeded = point_experiment(nodp, nodp_points[0], None, None, {}).experiment
    assert seeded.seed_weights == curve.base.seed_weights
    # Local-only and pooled baselines of the recipe at epsilon 8 and without DP, 3 seeds.
    baselines = load_sweep(sweeps / "dp-study-baselines.yaml")
    assert baselines.baselines == ("pooled", "local")
    runs = {r.name: r for r in plan_runs(baselines, None)}
    assert {n for n, r in runs.items() if r.kind != "federated"} == {
        f"recipe-eps{e}-s{s}-{k}" for e in ("8", "inf") for s in (1, 2, 3)
        for k in ("pooled", "local")}
    assert runs["recipe-eps8-s2-local"].experiment.clinic["training"]["trainable"] == "norm_bias"
    assert runs["recipe-eps8-s2-local"].experiment.seed == 2
