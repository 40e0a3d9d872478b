"""Sweeps: one base experiment, a grid of changes, one run after another, resumable.

A sweep file (docs/baselines-and-sweeps.md)::

    name: sweep-epsilon            # the sweep folder <runs_dir>/<name>/
    base: dp.yaml                  # experiment file (relative to the sweep file)
    grid:                          # every combination of these axes is one run
      target_epsilon: [1, 3, 8, .inf]   # calibrate noise for the planned schedule
      aggregator: [fedavg, fedopt]
      local_steps: [4]
      learning_rate: [0.003]            # client learning rate
      server_learning_rate: [0.01]      # fedopt/fedavgm only (dropped for fedavg)
      variant: [recipe, no-seed]        # named changes of the base, from ``variants``
      seed: [1, 2, 3]                   # the experiment seed (seed model, clinics)
    variants:                      # optional: name -> changes deep-merged into the base
      recipe: {}                   #   (a null value removes the key)
      no-seed: {seed_weights: null}
    baselines: [pooled, local]     # optional, run after the federated runs

Every run is a folder ``<runs_dir>/<sweep>/<point>/`` named by its grid values
(``eps3-fedavg-ls4``); ``sweep.json`` beside them indexes the runs and their status.
A run whose run.json says ``finished`` is skipped when the sweep is started again, so
an interrupted sweep resumes where it stopped (an unfinished run is redone).

Phantom data is generated once into ``<sweep>/data/`` and shared by every run (each
point's experiment names those folders), so all runs see the same patients. Each run
keeps its own privacy ledgers (``ledgers: run``, the default for phantom experiments):
otherwise the shared data's ledger would compose every point's epsilon and a later
point would be refused for the earlier points' spending.

``target_epsilon``: when the base experiment sets ``clinic.privacy.target_epsilon``, each
clinic calibrates its own noise for the point's target (every clinic ends at the target
for its own N). Otherwise the noise multiplier is calibrated
(:func:`fedseg_clinic.privacy.accounting.calibrate_noise`) for each clinic's planned schedule
(its training N, the batch size, the sum of local steps over all rounds, its delta) and
the largest is used, so that every clinic ends within the target. ``inf`` turns DP off.
Each run's config snapshot (run.json ``config``) carries a ``sweep`` section with the
sweep name, the grid values, ``target_epsilon`` and the calibrated ``noise_multiplier``:
``fedseg analyze`` reads ``target_epsilon`` from there for the privacy-utility plot.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import itertools
import json
import logging
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedseg.orchestration.experiment import (
    AGGREGATORS,
    Experiment,
    load_experiment,
    parse_experiment,
    read_yaml,
)
from fedseg.orchestration.runlog import RUN_NAME, read_run_info
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.io import atomic_write_text

logger = logging.getLogger(__name__)

SWEEP_INDEX = "sweep.json"
# Grid axes, in the order their tokens appear in run names.
AXES = ("variant", "target_epsilon", "aggregator", "local_steps", "learning_rate",
        "server_learning_rate", "seed")
# Axes that only change the server side: baselines do not depend on them.
SERVER_AXES = ("aggregator", "server_learning_rate")
# Axes whose values are names or integers rather than positive numbers.
_VARIANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]{0,23}(-[A-Za-z0-9_]+)*$")
BASELINE_KINDS = ("pooled", "local")
_TOP_KEYS = ("name", "base", "grid", "baselines", "variants")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A validated sweep file."""

    name: str
    base: Experiment
    grid: dict[str, list[Any]]
    baselines: tuple[str, ...] = ()
    source: str = "<sweep>"
    variants: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """One run of a sweep (a grid point's federated run or one of its baselines)."""

    name: str
    kind: str  # "federated", "pooled" or "local"
    params: dict[str, Any]
    experiment: Experiment
    noise_multiplier: float | None


@dataclasses.dataclass
class SweepResult:
    """What a sweep did: its folder and each run's status (finished, skipped, failed...)."""

    sweep_dir: Path
    statuses: dict[str, str]

    @property
    def failed(self) -> list[str]:
        """Names of runs that did not finish."""
        return [n for n, s in self.statuses.items()
                if s not in ("finished", "skipped", "planned")]


# -- the sweep file ---------------------------------------------------------------------


def _axis_values(source: str, axis: str, values: Any) -> list[Any]:
    """Check one grid axis; a scalar is a one-value axis."""
    if not isinstance(values, list):
        values = [values]
    if not values:
        raise FedsegError(f"{source}: grid.{axis}: needs at least one value")
    out: list[Any] = []
    for value in values:
        bad = FedsegError(f"{source}: grid.{axis}: bad value {value!r}")
        if axis == "aggregator":
            if value not in AGGREGATORS:
                raise FedsegError(f"{source}: grid.aggregator: must be one of "
                                  f"{', '.join(AGGREGATORS)}, got {value!r}")
            out.append(value)
        elif axis == "local_steps":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FedsegError(f"{source}: grid.local_steps: must be integers >= 1, "
                                  f"got {value!r}")
            out.append(value)
        elif axis == "seed":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise FedsegError(f"{source}: grid.seed: must be integers >= 0, got {value!r}")
            out.append(value)
        elif axis == "variant":
            if not isinstance(value, str) or not _VARIANT_RE.match(value):
                raise FedsegError(f"{source}: grid.variant: must be names from variants, "
                                  f"got {value!r}")
            out.append(value)
        elif axis == "target_epsilon":
            if isinstance(value, str) and value.strip().lower() in ("inf", ".inf", "infinity"):
                value = math.inf
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise FedsegError(f"{source}: grid.target_epsilon: must be numbers > 0 or "
                                  f"inf, got {value!r}")
            out.append(float(value))
        else:
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or value <= 0):
                raise bad
            out.append(float(value))
    return out


def parse_sweep(raw: Any, source: str, base_dir: Path) -> Sweep:
    """Validate a loaded sweep document (errors name the source and key).

    Args:
        raw: the parsed YAML.
        source: the sweep file's name for messages.
        base_dir: folder that ``base`` is relative to.

    Returns:
        The sweep, with its base experiment loaded and validated.

    Raises:
        FedsegError: one line naming the file and the key.
    """
    if not isinstance(raw, dict):
        raise FedsegError(f"{source}: a sweep must be a YAML mapping")
    for key in raw:
        if key not in _TOP_KEYS:
            raise FedsegError(f"{source}: {key}: unknown key (allowed: {', '.join(_TOP_KEYS)})")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise FedsegError(f"{source}: name: must be 1-64 letters, digits, . _ - (got {name!r})")
    base = raw.get("base")
    if not isinstance(base, str) or not base:
        raise FedsegError(f"{source}: base: must be the path of an experiment file")
    base_path = Path(base).expanduser()
    if not base_path.is_absolute():
        base_path = base_dir / base_path
    grid_raw = raw.get("grid")
    if not isinstance(grid_raw, dict) or not grid_raw:
        raise FedsegError(f"{source}: grid: must be a mapping with at least one axis "
                          f"({', '.join(AXES)})")
    grid: dict[str, list[Any]] = {}
    for axis in AXES:  # fixed order: names do not depend on the file's key order
        if axis in grid_raw:
            grid[axis] = _axis_values(source, axis, grid_raw[axis])
    for axis in grid_raw:
        if axis not in AXES:
            raise FedsegError(f"{source}: grid.{axis}: unknown axis (allowed: {', '.join(AXES)})")
    baselines_raw = raw.get("baselines") or []
    if not isinstance(baselines_raw, list) or any(b not in BASELINE_KINDS
                                                  for b in baselines_raw):
        raise FedsegError(f"{source}: baselines: must be a list of pooled, local; "
                          f"got {baselines_raw!r}")
    variants_raw = raw.get("variants") or {}
    if not isinstance(variants_raw, dict) or any(
            not isinstance(v, dict | None) for v in variants_raw.values()):
        raise FedsegError(f"{source}: variants: must map names to mappings of changes")
    variants = {str(k): dict(v or {}) for k, v in variants_raw.items()}
    for name_ in grid.get("variant", []):
        if name_ not in variants:
            raise FedsegError(f"{source}: grid.variant: {name_!r} is not in variants "
                              f"({', '.join(variants) or 'none given'})")
    if not base_path.is_file():
        raise FedsegError(f"{source}: base: experiment file {base_path} not found")
    exp = load_experiment(base_path)
    if "target_epsilon" in grid:
        for key in ("noise_multiplier", "dp"):
            if key in exp.client_settings:
                raise FedsegError(f"{source}: grid.target_epsilon: the base experiment sets "
                                  f"client_settings.{key}, which would override the "
                                  "calibrated noise")
    return Sweep(name=name, base=exp, grid=grid, baselines=tuple(dict.fromkeys(baselines_raw)),
                 source=source, variants=variants)


def load_sweep(path: Path) -> Sweep:
    """Read and validate a sweep file (and its base experiment).

    Raises:
        FedsegError: unreadable file, bad YAML, or a bad key, named with the file.
    """
    path = Path(path).expanduser().resolve()
    return parse_sweep(read_yaml(path, "sweep file"), str(path), path.parent)


# -- grid -------------------------------------------------------------------------------


def _token(axis: str, value: Any) -> str:
    if axis == "target_epsilon":
        return "epsinf" if math.isinf(value) else f"eps{value:g}"
    if axis == "aggregator":
        return str(value)
    if axis == "local_steps":
        return f"ls{value}"
    if axis == "learning_rate":
        return f"lr{value:g}"
    if axis == "variant":
        return str(value)
    if axis == "seed":
        return f"s{value}"
    return f"slr{value:g}"


def point_name(params: dict[str, Any], axes: tuple[str, ...] = AXES) -> str:
    """Run name of a grid point: its values as tokens, in axis order (``eps3-fedavg-ls4``)."""
    return "-".join(_token(a, params[a]) for a in axes if a in params)


def expand_grid(sweep: Sweep) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in file order (seeds last), no duplicates.

    ``server_learning_rate`` only applies to fedopt and fedavgm: a point that aggregates with fedavg
    (from the grid or the base experiment) drops it, and the duplicates this makes are
    removed.
    """
    # Seeds vary slowest: an interrupted sweep has every point once before it repeats any.
    axes = sorted(sweep.grid, key=lambda a: a != "seed")
    points: dict[str, dict[str, Any]] = {}
    for combo in itertools.product(*(sweep.grid[a] for a in axes)):
        params = {a: dict(zip(axes, combo, strict=True))[a] for a in sweep.grid}
        aggregator = params.get("aggregator", sweep.base.session.aggregator)
        if aggregator not in ("fedopt", "fedavgm"):
            params.pop("server_learning_rate", None)
        points.setdefault(point_name(params), params)
    return list(points.values())


# -- experiments of a point -------------------------------------------------------------


def _n_train(folder: Path) -> int:
    """Training patients a clinic will use (cases with at least one labelled organ)."""
    from fedseg_clinic.cases import read_manifest

    return sum(1 for e in read_manifest(folder).split("train") if e.labelled_organs)


def plan_noise(exp: Experiment, n_train: dict[str, int], target_epsilon: float,
               cache: dict[tuple[Any, ...], float] | None = None) -> float:
    """The noise multiplier that keeps every clinic within ``target_epsilon``.

    Each clinic's plan: q = batch_size / N_clinic, T = the sum of local steps over all
    rounds, delta = the experiment's or 1 / (10 N_clinic); the largest calibrated sigma
    is returned (epsilon falls as sigma grows, so every clinic meets the target).

    Args:
        exp: the point's experiment (clinic settings and per-round client settings).
        n_train: training patients per clinic.
        target_epsilon: the budget every clinic must stay within.
        cache: calibrations already done, by (N, batch, steps, epsilon, delta); a
            calibration takes seconds, and many points share one.

    Raises:
        FedsegError: a per-round batch-size schedule (one q per plan is needed), or a
            delta that is not below 1 / N.
    """
    from fedseg_clinic.privacy.accounting import calibrate_noise, default_delta
    from fedseg_clinic.settings import settings_from_mapping, with_server_overrides

    where = f"{exp.source or exp.name}"
    base = settings_from_mapping({"model": exp.model, **exp.clinic}, f"{where}: clinic")
    rounds = [with_server_overrides(base, exp.settings_for_round(k))
              for k in range(1, exp.session.rounds + 1)]
    batch_sizes = {s.training.batch_size for s in rounds}
    if len(batch_sizes) != 1:
        raise FedsegError(f"{where}: target_epsilon needs one batch_size for all rounds, "
                          f"got {sorted(batch_sizes)}")
    batch = batch_sizes.pop()
    steps = sum(s.training.local_steps for s in rounds)
    sigmas = []
    for clinic, n in n_train.items():
        delta = base.privacy.delta if base.privacy.delta is not None else default_delta(n)
        key = (n, batch, steps, target_epsilon, delta)
        if cache is None or key not in cache:
            try:
                sigma = calibrate_noise(n, batch, steps, target_epsilon, delta)
            except FedsegError as exc:
                raise FedsegError(f"{where}: clinic {clinic} (N={n}): {exc}") from None
            if cache is None:
                sigmas.append(sigma)
                continue
            cache[key] = sigma
        sigmas.append(cache[key])
    return max(sigmas)


def _merge_changes(doc: dict[str, Any], changes: dict[str, Any]) -> None:
    """Deep-merge a variant's changes into an experiment document; None removes a key."""
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        elif isinstance(value, dict) and isinstance(doc.get(key), dict):
            _merge_changes(doc[key], value)
        else:
            doc[key] = copy.deepcopy(value)


def _set_training(doc: dict[str, Any], key: str, value: Any) -> None:
    """A per-round key the base sends as client setting is replaced there, else in clinic."""
    if key in doc.get("client_settings", {}):
        doc["client_settings"][key] = value
    else:
        doc.setdefault("clinic", {}).setdefault("training", {})[key] = value


def point_experiment(sweep: Sweep, params: dict[str, Any], data: dict[str, Path] | None,
                     n_train: dict[str, int] | None,
                     cache: dict[tuple[Any, ...], float] | None = None) -> SweepRun:
    """The federated experiment of one grid point (validated like any experiment file).

    Args:
        sweep: the sweep.
        params: the point's grid values.
        data: shared clinic folders (replaces the base's data section), or None to keep it.
        n_train: training patients per clinic (needed with target_epsilon).
        cache: noise calibrations shared between points (see :func:`plan_noise`).
    """
    base = sweep.base
    name = point_name(params)
    if len(name) > 64:
        raise FedsegError(f"{sweep.source}: run name {name!r} is longer than 64 characters")
    doc = copy.deepcopy(base.raw)
    doc["name"] = name
    if "variant" in params:
        _merge_changes(doc, sweep.variants[params["variant"]])
    if "seed" in params:
        doc["seed"] = params["seed"]
    if data is not None:
        doc["data"] = {"clinics": {c: str(p) for c, p in data.items()}}
        # The shared phantom data would otherwise compose every point's epsilon: each
        # run keeps its own ledgers (the base's choice when it says so explicitly).
        doc.setdefault("ledgers", base.ledgers)
    for key in ("local_steps", "learning_rate"):
        if key in params:
            _set_training(doc, key, params[key])
    session = doc.setdefault("session", {})
    if "aggregator" in params:
        if params["aggregator"] != base.session.aggregator:
            session.pop("aggregator_kwargs", None)
        session["aggregator"] = params["aggregator"]
    if "server_learning_rate" in params:
        session.setdefault("aggregator_kwargs", {})["learning_rate"] = \
            params["server_learning_rate"]
    base_dir = base.source.parent if base.source else None
    source = f"{sweep.source}: point {name}"
    exp = parse_experiment(doc, source, base_dir)
    noise: float | None = None
    if "target_epsilon" in params:
        privacy = doc.setdefault("clinic", {}).setdefault("privacy", {})
        eps = params["target_epsilon"]
        if math.isinf(eps):
            privacy["enabled"] = False
            privacy.pop("target_epsilon", None)
            privacy.pop("planned_rounds", None)
        elif privacy.get("target_epsilon") is not None:
            # Per-clinic calibration (each clinic ends at the target for its own N).
            privacy["enabled"] = True
            privacy["target_epsilon"] = eps
        else:
            assert n_train is not None, "n_train is needed to calibrate noise"
            noise = round(plan_noise(exp, n_train, eps, cache), 6)
            privacy["enabled"] = True
            privacy["noise_multiplier"] = noise
        exp = parse_experiment(doc, source, base_dir)
    # Not an experiment key: recorded in run.json config for the analysis (target_epsilon).
    raw = {**doc, "sweep": {"sweep": sweep.name, "point": name, "params": params,
                            "base_experiment": base.name,
                            "target_epsilon": params.get("target_epsilon"),
                            "noise_multiplier": noise}}
    exp = dataclasses.replace(exp, raw=raw, source=base.source)
    return SweepRun(name, "federated", params, exp, noise)


def baseline_runs(sweep: Sweep, point: SweepRun) -> list[SweepRun]:
    """The baselines of a point.

    They are named without the server-side axes, so points that differ only in
    aggregation share them (the second is skipped as already planned).
    """
    client_axes = tuple(a for a in AXES if a not in SERVER_AXES)
    params = {a: v for a, v in point.params.items() if a in client_axes}
    stem = point_name(params, client_axes) or sweep.base.name
    runs = []
    for kind in sweep.baselines:
        section = {**point.experiment.raw["sweep"], "point": stem, "params": params}
        if kind == "pooled":
            # The noise was calibrated for the clinics' N; the pooled N spends less, so
            # the analysis should take the pooled run's own (final) epsilon instead.
            # (find_key searches every depth: params may not hold it either.)
            section["clinic_target_epsilon"] = section.pop("target_epsilon")
            section["params"] = {a: v for a, v in params.items() if a != "target_epsilon"}
        raw = {**point.experiment.raw, "name": stem, "sweep": section}
        exp = dataclasses.replace(point.experiment, name=stem, raw=raw)
        runs.append(SweepRun(f"{stem}-{kind}", kind, params, exp, point.noise_multiplier))
    return runs


def plan_runs(sweep: Sweep, data: dict[str, Path] | None) -> list[SweepRun]:
    """Every run of the sweep, federated first, then the (deduplicated) baselines."""
    n_train = None
    if "target_epsilon" in sweep.grid:
        folders = data if data is not None else sweep.base.data.clinic_dirs
        n_train = {c: _n_train(f) for c, f in folders.items()}
    cache: dict[tuple[Any, ...], float] = {}
    points = [point_experiment(sweep, p, data, n_train, cache) for p in expand_grid(sweep)]
    runs = list(points)
    seen = {r.name for r in runs}
    for point in points:
        for run in baseline_runs(sweep, point):
            if run.name not in seen:
                seen.add(run.name)
                runs.append(run)
    return runs


# -- running ----------------------------------------------------------------------------


def run_status(run_dir: Path) -> str | None:
    """The status in a run folder's run.json (None when there is none or it is unreadable)."""
    if not (run_dir / RUN_NAME).is_file():
        return None
    try:
        return str(read_run_info(run_dir).get("status"))
    except FedsegError:
        return None


def shared_data(sweep: Sweep, sweep_dir: Path) -> dict[str, Path] | None:
    """Generate the base's phantom clinics once into ``<sweep>/data`` (reused on resume).

    Returns None for a base experiment with existing clinic folders (used as they are).
    """
    from fedseg.orchestration.runner import prepare_data

    if sweep.base.data.phantoms is None:
        return None
    folders = {c: sweep_dir / "data" / c for c in sweep.base.data.clinic_names()}
    stamp = sweep_dir / "data" / "sweep-data.json"
    spec = dataclasses.asdict(sweep.base.data.phantoms) | {"seed": sweep.base.seed}
    if stamp.is_file() and all((f / "manifest.json").is_file() for f in folders.values()):
        if json.loads(stamp.read_text()) == json.loads(json.dumps(spec)):
            return folders
    generated = prepare_data(sweep.base, sweep_dir)
    atomic_write_text(stamp, json.dumps(spec, indent=2, sort_keys=True))
    return {c: Path(p) for c, p in generated.items()}


def _write_index(sweep: Sweep, sweep_dir: Path, runs: list[SweepRun],
                 statuses: dict[str, str]) -> None:
    index = {
        "name": sweep.name, "sweep_file": sweep.source,
        "base_experiment": str(sweep.base.source) if sweep.base.source else sweep.base.name,
        "grid": sweep.grid, "baselines": list(sweep.baselines),
        "updated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "runs": [{"name": r.name, "kind": r.kind, "params": r.params,
                  "noise_multiplier": r.noise_multiplier,
                  "run_dir": str(sweep_dir / r.name),
                  "status": statuses.get(r.name, "pending")} for r in runs],
    }
    atomic_write_text(sweep_dir / SWEEP_INDEX, json.dumps(index, indent=2, default=str))


def run_sweep(sweep: Sweep, runs_dir: Path, *, progress: Progress | None = None,
              run_federated: Callable[..., Any] | None = None,
              run_baseline: Callable[..., Any] | None = None,
              dry_run: bool = False, network_root: Path | None = None) -> SweepResult:
    """Run every run of the sweep that has not finished yet, one after another.

    Args:
        sweep: the validated sweep.
        runs_dir: parent of the sweep folder ``<runs_dir>/<sweep.name>/``.
        progress: called with one line per run (and the runs' own progress lines).
        run_federated: ``f(exp, runs_dir, progress=..., overwrite=True)`` with a
            ``.status``; default :func:`fedseg.orchestration.runner.run_experiment`.
        run_baseline: ``f(exp, kind, runs_dir, progress=..., overwrite=True)``; default
            :func:`fedseg.orchestration.baselines.run_baseline` (runs ``<name>-<kind>``).
        dry_run: plan (data, noise calibration, sweep.json) but run nothing.
        network_root: run every federated point on the network already up there
            (``fedseg network up``) instead of starting one per run: on a loaded
            machine the start costs about a minute per run.

    Returns:
        Each run's status: finished, skipped (finished before), failed: ..., or planned.

    Raises:
        KeyboardInterrupt: after sweep.json marks the current run "interrupted".
    """
    if run_federated is None:
        from fedseg.orchestration.runner import run_experiment as run_federated
    if run_baseline is None:
        from fedseg.orchestration.baselines import run_baseline
    say = progress or (lambda _line: None)
    sweep_dir = Path(runs_dir).resolve() / sweep.name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    data = shared_data(sweep, sweep_dir)
    runs = plan_runs(sweep, data)
    statuses: dict[str, str] = {}
    for run in runs:
        old = run_status(sweep_dir / run.name)
        statuses[run.name] = "skipped" if old == "finished" else "pending"
    _write_index(sweep, sweep_dir, runs, statuses)
    say(f"sweep {sweep.name}: {len(runs)} runs in {sweep_dir} "
        f"({sum(s == 'skipped' for s in statuses.values())} finished before)")
    for i, run in enumerate(runs, start=1):
        noise = "" if run.noise_multiplier is None else f", sigma {run.noise_multiplier:.4f}"
        head = f"[{i}/{len(runs)}] {run.name} ({run.kind}{noise})"
        if statuses[run.name] == "skipped":
            say(f"{head}: finished before, skipped")
            continue
        if dry_run:
            statuses[run.name] = "planned"
            say(f"{head}: planned")
            continue
        say(f"{head}: running")
        statuses[run.name] = "running"
        _write_index(sweep, sweep_dir, runs, statuses)
        try:
            if run.kind == "federated":
                extra = {"network_root": network_root} if network_root is not None else {}
                result = run_federated(run.experiment, sweep_dir, progress=progress,
                                       overwrite=True, **extra)
            else:
                result = run_baseline(run.experiment, run.kind, sweep_dir, progress=progress,
                                      overwrite=True)
            statuses[run.name] = str(result.status)
        except KeyboardInterrupt:
            statuses[run.name] = "interrupted"
            _write_index(sweep, sweep_dir, runs, statuses)
            raise
        except FedsegError as exc:
            logger.warning("%s: %s", run.name, exc)
            statuses[run.name] = f"failed: {exc}"
        say(f"{head}: {statuses[run.name]}")
        _write_index(sweep, sweep_dir, runs, statuses)
    _write_index(sweep, sweep_dir, runs, statuses)
    return SweepResult(sweep_dir=sweep_dir, statuses=statuses)

