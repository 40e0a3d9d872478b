"""Numbers from round logs: final/best Dice, rounds-to-target, Dice AUC, epsilon, time.

A run folder holds ``rounds.csv`` and ``run.json`` (see
:mod:`fedseg.orchestration.runlog`). This module turns one or several of them into
plain numbers; :mod:`fedseg.analysis.plots` and :mod:`fedseg.analysis.report` draw and
write them. Definitions (also in docs/analysis.md):

- Round axis: every integer from the smallest to the largest round number in the log.
  A round with no record for a client is NaN for that client (a gap, never a zero).
- Dice of a round: the *client mean* of ``val_dice_mean``, unweighted (mean over the
  clients that reported a finite value that round) or weighted by each client's
  ``n_val`` (clients without a finite ``n_val`` are left out of the weighted mean).
  The ``global`` row is not a client; it is used for Dice only when no client row
  carries ``val_dice_mean`` (a baseline that logs its numbers as ``global``).
- Per organ: NaN-mean over the clients that label the organ (NaN = not contoured).
- Final: the values at the final round = the last round with a finite client-mean Dice.
  Best: the maximum over rounds, with its round.
- rounds_to_target: the first round whose unweighted client-mean Dice is >= target.
  seconds_to_target: the sum of the global ``round_seconds`` of every round up to and
  including it; null if the target is never reached or a round on the way has no
  ``round_seconds``.
- bytes_to_target: model bytes moved up to and including that round: for each round,
  the global model sent to every client that reported and their updates back
  (2 x ``model_bytes`` of run.json per client); null without ``model_bytes`` (baselines).
- Seed groups: runs whose run.json config is the same once every ``seed`` and the
  ``name`` are left out are replicates of one setting. For each group: how many seeds
  reached the target, and the mean with a 95% Student-t confidence interval over the
  seeds of final Dice and of rounds, seconds and bytes to target (over the seeds that
  reached it; an interval needs two of them).
- dice_auc: the mean over rounds 1..R (R = last round in the log) of the unweighted
  client-mean Dice, where a round without a value carries the last measured value
  forward and rounds before the first measurement count as 0. It lies in [0, 1]; a run
  that reaches Dice d at round 1 and keeps it scores d.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedseg.orchestration.runlog import (
    GLOBAL,
    RUN_NAME,
    pivot,
    read_rounds,
    read_run_info,
)
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.organs import ALL_ORGANS

logger = logging.getLogger(__name__)

DICE_MEAN = "val_dice_mean"
DICE_PREFIX = "val_dice_"
HD95_PREFIX = "val_hd95_"
KINDS = ("federated", "pooled", "local")


@dataclasses.dataclass(frozen=True)
class RunLog:
    """One run's round log, read and pivoted.

    Attributes:
        run_dir: the run folder.
        name: run.json "name" (the folder name when absent).
        kind: "federated", "pooled" or "local" (run.json "kind", default "federated").
        info: the whole run.json object.
        table: {(round, client): {metric: value}} from rounds.csv.
        rounds: every round number from the first to the last in the log.
        clients: client names (without "global"), sorted.
    """

    run_dir: Path
    name: str
    kind: str
    info: dict[str, Any]
    table: dict[tuple[int, str], dict[str, float]]
    rounds: tuple[int, ...]
    clients: tuple[str, ...]

    @property
    def dice_clients(self) -> tuple[str, ...]:
        """Clients whose ``val_dice_mean`` rows make up the Dice curves.

        The real clients, or ("global",) when no client row carries ``val_dice_mean``.
        """
        for (_rnd, client), metrics in self.table.items():
            if client != GLOBAL and DICE_MEAN in metrics:
                return self.clients
        return (GLOBAL,)


def load_run(run_dir: Path) -> RunLog:
    """Read a run folder's rounds.csv and run.json.

    Args:
        run_dir: folder holding rounds.csv and run.json.

    Returns:
        The pivoted round log.

    Raises:
        FedsegError: missing or malformed files, an empty log, or a bad "kind".
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FedsegError(f"{run_dir}: not a folder (expected a run folder)")
    info = read_run_info(run_dir)
    records = read_rounds(run_dir)
    if not records:
        raise FedsegError(f"{run_dir / 'rounds.csv'}: round log has no rows")
    kind = info.get("kind", "federated")
    if kind not in KINDS:
        raise FedsegError(
            f"{run_dir / RUN_NAME}: kind must be one of {', '.join(KINDS)}, got {kind!r}"
        )
    name = info.get("name")
    if not isinstance(name, str) or not name:
        name = run_dir.resolve().name
    table = pivot(records)
    round_numbers = [rnd for rnd, _client in table]
    rounds = tuple(range(min(round_numbers), max(round_numbers) + 1))
    clients = tuple(sorted({client for _rnd, client in table if client != GLOBAL}))
    return RunLog(run_dir, name, kind, info, table, rounds, clients)


def metric_series(run: RunLog, client: str, metric: str) -> np.ndarray:
    """One client's metric over ``run.rounds`` (NaN where not logged)."""
    return np.array(
        [run.table.get((rnd, client), {}).get(metric, math.nan) for rnd in run.rounds],
        dtype=float,
    )


def client_matrix(run: RunLog, metric: str, clients: Sequence[str] | None = None) -> np.ndarray:
    """A (rounds, clients) array of one metric (NaN where not logged)."""
    names = run.clients if clients is None else clients
    if not names:
        return np.full((len(run.rounds), 0), math.nan)
    return np.stack([metric_series(run, client, metric) for client in names], axis=1)


def nanmean_rows(matrix: np.ndarray) -> np.ndarray:
    """Mean of each row over its finite entries; NaN for a row with none (no warning)."""
    finite = np.isfinite(matrix)
    counts = finite.sum(axis=1)
    sums = np.where(finite, matrix, 0.0).sum(axis=1)
    out = np.full(matrix.shape[0], math.nan)
    np.divide(sums, counts, out=out, where=counts > 0)
    return out


def weighted_mean_rows(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted mean of each row over entries where value and weight are finite, weight > 0."""
    usable = np.isfinite(values) & np.isfinite(weights) & (weights > 0)
    w = np.where(usable, weights, 0.0)
    totals = w.sum(axis=1)
    sums = (np.where(usable, values, 0.0) * w).sum(axis=1)
    out = np.full(values.shape[0], math.nan)
    np.divide(sums, totals, out=out, where=totals > 0)
    return out


def dice_curve(run: RunLog, weighted: bool = False) -> np.ndarray:
    """Client-mean ``val_dice_mean`` per round (see the module docstring)."""
    clients = run.dice_clients
    values = client_matrix(run, DICE_MEAN, clients)
    if not weighted:
        return nanmean_rows(values)
    return weighted_mean_rows(values, client_matrix(run, "n_val", clients))


def client_mean_curve(run: RunLog, metric: str) -> np.ndarray:
    """Unweighted NaN-mean of a metric over the Dice clients, per round."""
    return nanmean_rows(client_matrix(run, metric, run.dice_clients))


def organ_names(run: RunLog) -> list[str]:
    """Organs with a ``val_dice_<organ>`` metric in the log, in order.

    The run's organ set order (run.json ``organ_set``), else the canonical order, then
    any others.
    """
    found = {
        metric[len(DICE_PREFIX):]
        for metrics in run.table.values()
        for metric in metrics
        if metric.startswith(DICE_PREFIX) and metric != DICE_MEAN
    }
    record = run.info.get("organ_set")
    order = [str(o) for o in record.get("organs", [])] if isinstance(record, dict) else []
    order += [o for o in ALL_ORGANS if o not in order]
    return [o for o in order if o in found] + sorted(found - set(order))


def organ_set_label(run: RunLog) -> str | None:
    """``name@vVERSION`` of the run's organ set (run.json), or None for older runs."""
    record = run.info.get("organ_set")
    if isinstance(record, dict) and record.get("name"):
        return f"{record['name']}@v{record.get('version')}"
    return None


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def last_finite_index(series: np.ndarray) -> int | None:
    """Index of the last finite entry, or None."""
    idx = np.flatnonzero(np.isfinite(series))
    return int(idx[-1]) if idx.size else None


def best_of(rounds: Sequence[int], series: np.ndarray) -> tuple[float | None, int | None]:
    """(maximum finite value, its first round), or (None, None) when nothing is finite."""
    if not np.isfinite(series).any():
        return None, None
    idx = int(np.nanargmax(series))
    return float(series[idx]), int(rounds[idx])


def rounds_to_target(rounds: Sequence[int], series: np.ndarray, target: float) -> int | None:
    """The first round whose value is >= target, or None if never reached."""
    for rnd, value in zip(rounds, series, strict=True):
        if math.isfinite(value) and value >= target:
            return int(rnd)
    return None


def seconds_to_round(run: RunLog, last_round: int) -> float | None:
    """Sum of global ``round_seconds`` over the log's rounds up to ``last_round``.

    None when a round on the way has no finite ``round_seconds``.
    """
    total = 0.0
    for rnd in run.rounds:
        if rnd > last_round:
            break
        if rnd < 1:
            continue  # round 0 (seed-model evaluation) is not a training round
        value = run.table.get((rnd, GLOBAL), {}).get("round_seconds", math.nan)
        if not math.isfinite(value):
            return None
        total += value
    return total


def bytes_to_round(run: RunLog, last_round: int) -> float | None:
    """Model bytes moved in rounds up to ``last_round``: 2 x model size per reporting client."""
    model_bytes = run.info.get("model_bytes")
    if not isinstance(model_bytes, int | float) or model_bytes <= 0:
        return None
    total = 0
    for rnd in run.rounds:
        if rnd > last_round:
            break
        total += 2 * sum((int(rnd), client) in run.table for client in run.clients)
    return float(total * model_bytes)


def dice_auc(rounds: Sequence[int], series: np.ndarray) -> float | None:
    """Mean client-mean Dice over rounds 1..R, missing rounds carried forward.

    Rounds before the first measured one count as 0. Rounds below 1 (a seed-model
    evaluation) are not part of the mean. None when the log has no round >= 1.

    Args:
        rounds: consecutive round numbers.
        series: the value of each round (NaN = not measured).

    Returns:
        The normalised area under the curve, in the units of ``series``.
    """
    last = 0.0
    values = []
    for rnd, value in zip(rounds, series, strict=True):
        if math.isfinite(value):
            last = float(value)
        if rnd >= 1:
            values.append(last)
    return float(np.mean(values)) if values else None


def final_epsilons(run: RunLog) -> dict[str, float | None]:
    """Each client's last finite ``epsilon`` (None when it never logged one)."""
    out: dict[str, float | None] = {}
    for client in run.clients:
        series = metric_series(run, client, "epsilon")
        idx = last_finite_index(series)
        out[client] = None if idx is None else float(series[idx])
    return out


def missing_clients(run: RunLog) -> dict[int, list[str]]:
    """Rounds in which some client of the run has no record at all, with those clients."""
    out: dict[int, list[str]] = {}
    for rnd in run.rounds:
        absent = [c for c in run.clients if (rnd, c) not in run.table]
        if absent:
            out[rnd] = absent
    return out


def _total(run: RunLog, clients: Iterable[str], metric: str) -> float | None:
    values = [
        run.table.get((rnd, client), {}).get(metric, math.nan)
        for rnd in run.rounds
        for client in clients
    ]
    finite = [v for v in values if math.isfinite(v)]
    return float(sum(finite)) if finite else None


def find_key(data: Any, key: str) -> Any:
    """The value of the first ``key`` met in a depth-first walk of nested dicts, or None."""
    if isinstance(data, dict):
        if key in data:
            return data[key]
        for value in data.values():
            found = find_key(value, key)
            if found is not None:
                return found
    return None


def run_epsilon(run: RunLog) -> float | None:
    """The run's privacy budget: config ``target_epsilon``, else the largest final epsilon.

    None for a run without DP (no epsilon anywhere, or an infinite one).
    """
    target = find_key(run.info.get("config", {}), "target_epsilon")
    if isinstance(target, int | float) and not isinstance(target, bool):
        return _finite_or_none(float(target))
    finals = [v for v in final_epsilons(run).values() if v is not None]
    return _finite_or_none(max(finals)) if finals else None


def json_safe(data: Any) -> Any:
    """A copy of nested dicts/lists with non-finite floats replaced by None (strict JSON)."""
    if isinstance(data, dict):
        return {str(key): json_safe(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [json_safe(value) for value in data]
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


def summarize_run(run: RunLog, target: float | None = None) -> dict[str, Any]:
    """The summary.json entry of one run (JSON-ready: NaN becomes None).

    Args:
        run: the loaded run.
        target: the Dice target for rounds/seconds to target, or None.

    Returns:
        A dict of plain numbers, strings, lists and dicts.
    """
    rounds = run.rounds
    dice = dice_curve(run)
    dice_w = dice_curve(run, weighted=True)
    final_idx = last_finite_index(dice)
    final_round = None if final_idx is None else int(rounds[final_idx])

    def at_final(series: np.ndarray) -> float | None:
        return None if final_idx is None else _finite_or_none(series[final_idx])

    best, best_round = best_of(rounds, dice)
    best_w, best_w_round = best_of(rounds, dice_w)
    organs: dict[str, Any] = {}
    for organ in organ_names(run):
        series = client_mean_curve(run, DICE_PREFIX + organ)
        organ_best, organ_best_round = best_of(rounds, series)
        labelled_by = [
            c for c in run.dice_clients
            if np.isfinite(metric_series(run, c, DICE_PREFIX + organ)).any()
        ]
        organs[organ] = {
            "final_dice": at_final(series),
            "best_dice": organ_best,
            "best_round": organ_best_round,
            "final_hd95_mm": at_final(client_mean_curve(run, HD95_PREFIX + organ)),
            "labelled_by": labelled_by,
        }
    reached = None if target is None else rounds_to_target(rounds, dice, target)
    timings = run.info.get("timings")
    return json_safe({
        "name": run.name,
        "run_dir": str(run.run_dir),
        "kind": run.kind,
        # Secure aggregation (docs/secure-aggregation.md); runs before it existed: plain.
        "aggregation": str(run.info.get("aggregation", "plain")),
        "seed": run.info.get("seed"),
        "clients": list(run.clients),
        "organ_set": organ_set_label(run),
        "first_round": int(rounds[0]),
        "last_round": int(rounds[-1]),
        "final_round": final_round,
        "final_dice_mean": at_final(dice),
        "final_dice_mean_weighted": at_final(dice_w),
        "best_dice_mean": best,
        "best_round": best_round,
        "best_dice_mean_weighted": best_w,
        "best_round_weighted": best_w_round,
        "organs": organs,
        "target_dice": target,
        "rounds_to_target": reached,
        "seconds_to_target": None if reached is None else seconds_to_round(run, reached),
        "bytes_to_target": None if reached is None else bytes_to_round(run, reached),
        "dice_auc": dice_auc(rounds, dice),
        "final_epsilon": final_epsilons(run),
        "epsilon": run_epsilon(run),
        "train_seconds_total": _total(run, run.clients, "train_seconds"),
        "round_seconds_total": _total(run, (GLOBAL,), "round_seconds"),
        "missing_clients": {str(rnd): names for rnd, names in missing_clients(run).items()},
        "timings": timings if isinstance(timings, dict) else {},
    })


def resolve_target(
    runs: Sequence[RunLog],
    target_dice: float | None = None,
    target_fraction: float | None = None,
) -> tuple[float | None, str]:
    """The Dice target and a line saying where it came from.

    Args:
        runs: the loaded runs.
        target_dice: an absolute target in [0, 1].
        target_fraction: a fraction of the final Dice of the one "pooled" run in ``runs``.

    Returns:
        (target or None, description).

    Raises:
        FedsegError: both or an out-of-range value given; a fraction without exactly one
            pooled setting (one run or seeds of one), or a pooled run without final Dice.
    """
    if target_dice is not None and target_fraction is not None:
        raise FedsegError("give either a target Dice or a target fraction, not both")
    if target_dice is not None:
        if not 0.0 <= target_dice <= 1.0:
            raise FedsegError(f"target Dice {target_dice} is not in [0, 1]")
        return target_dice, f"Dice {target_dice:g}"
    if target_fraction is None:
        return None, "no target"
    if not 0.0 < target_fraction <= 1.0:
        raise FedsegError(f"target fraction {target_fraction} is not in (0, 1]")
    pooled = [run for run in runs if run.kind == "pooled"]
    if not pooled or len({setting_key(run) for run in pooled}) != 1:
        found = ", ".join(str(run.run_dir) for run in pooled) or "none"
        raise FedsegError(
            f"target fraction needs exactly one pooled setting among the inputs (one "
            f"pooled run, or seeds of one) (found {found})"
        )
    finals = []
    for run in pooled:
        final = summarize_run(run)["final_dice_mean"]
        if final is None:
            raise FedsegError(f"{run.run_dir}: pooled run has no val_dice_mean to scale")
        finals.append(final)
    final = float(np.mean(finals))
    target = target_fraction * final
    if len(pooled) == 1:
        return target, (f"{target_fraction:g} x final Dice {final:.4f} of pooled run "
                        f"{pooled[0].name}")
    return target, (f"{target_fraction:g} x mean final Dice {final:.4f} of {len(pooled)} "
                    f"pooled seeds ({', '.join(run.name for run in pooled)})")


def _without_seeds(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_seeds(v) for k, v in sorted(value.items()) if k != "seed"}
    if isinstance(value, list | tuple):
        return [_without_seeds(v) for v in value]
    return value


def setting_key(run: RunLog) -> str:
    """What makes runs replicates of one setting: kind + config without seeds and name.

    A sweep's point name, which carries the seed, is left out too.
    """
    config = run.info.get("config")
    config = {k: v for k, v in config.items() if k != "name"} if isinstance(config, dict) else {}
    if isinstance(config.get("sweep"), dict):
        # A sweep's seed axis puts the seed into the point's name as well.
        config["sweep"] = {k: v for k, v in config["sweep"].items() if k != "point"}
    return json.dumps({"kind": run.kind, "config": _without_seeds(config)}, sort_keys=True,
                      default=str)


def mean_ci95(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean and the half-width of a 95% Student-t confidence interval (None below n=2)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(finite)
    if n == 0:
        return {"n": 0, "mean": None, "ci95": None}
    mean = float(np.mean(finite))
    if n < 2:
        return {"n": 1, "mean": mean, "ci95": None}
    from scipy import stats

    half = float(stats.t.ppf(0.975, n - 1) * np.std(finite, ddof=1) / math.sqrt(n))
    return {"n": n, "mean": mean, "ci95": half}


def _group_label(names: Sequence[str]) -> str:
    prefix = os.path.commonprefix(list(names)).rstrip("-_. ")  # noqa: RUF071 - names, not paths
    prefix = re.sub(r"[-_.]s\d*$", "", prefix)  # a sweep's seed token: "recipe-eps8-s"
    return prefix or names[0]


def summarize_groups(runs: Sequence[RunLog], entries: Sequence[dict[str, Any]]
                     ) -> list[dict[str, Any]]:
    """One entry per setting with two or more seeds (see the module docstring).

    Args:
        runs: the loaded runs.
        entries: their :func:`summarize_run` entries, in the same order.

    Returns:
        Groups in order of first appearance.
    """
    groups: dict[str, list[int]] = {}
    for index, run in enumerate(runs):
        groups.setdefault(setting_key(run), []).append(index)
    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        chosen = [entries[i] for i in members]
        reached = [e for e in chosen if e["rounds_to_target"] is not None]
        out.append(json_safe({
            "label": _group_label([e["name"] for e in chosen]),
            "kind": chosen[0]["kind"],
            "runs": [e["name"] for e in chosen],
            "seeds": [e["seed"] for e in chosen],
            "target_dice": chosen[0]["target_dice"],
            "reached_target": len(reached),
            "final_dice_mean": mean_ci95([e["final_dice_mean"] for e in chosen]),
            "rounds_to_target": mean_ci95([e["rounds_to_target"] for e in reached]),
            "seconds_to_target": mean_ci95([e["seconds_to_target"] for e in reached]),
            "bytes_to_target": mean_ci95([e["bytes_to_target"] for e in reached]),
        }))
    return out


_EPS_TOKEN = re.compile(r"^eps(inf|[0-9.e+-]+)$")
_SEED_TOKEN = re.compile(r"^s[0-9]+$")


def technique_label(run: RunLog) -> str:
    """The line a run belongs to on the privacy-utility curve.

    Its (sweep point) name without the epsilon and seed tokens: ``recipe-eps8-s2`` ->
    ``recipe``; ``k4-eps8-s1`` -> ``k4``.
    """
    sweep = run.info.get("config", {}).get("sweep") if isinstance(
        run.info.get("config"), dict) else None
    name = str(sweep.get("point", run.name)) if isinstance(sweep, dict) else run.name
    tokens = [t for t in name.split("-") if not (_EPS_TOKEN.match(t) or _SEED_TOKEN.match(t))]
    label = "-".join(tokens) or "runs"
    if run.kind != "federated" and not label.endswith(run.kind):
        label += f"-{run.kind}"
    return label


def _spread(values: Sequence[float | None]) -> dict[str, Any]:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": len(finite), "mean": float(np.mean(finite)),
            "std": float(np.std(finite, ddof=1)) if len(finite) > 1 else None,
            "min": min(finite), "max": max(finite)}


def privacy_utility(runs: Sequence[RunLog], entries: Sequence[dict[str, Any]]
                    ) -> list[dict[str, Any]]:
    """The privacy-utility curve, one line per technique and one point per epsilon.

    Lines: :func:`technique_label`; points: epsilon (``None`` = no DP) with the final
    client-mean Dice and each organ's as mean, sample standard deviation, min and max
    over the seeds at that point.

    A pooled run's epsilon is its own final one, which differs between seeds: pooled
    points are keyed by the clinics' target (config ``clinic_target_epsilon``) instead.
    """
    lines: dict[str, dict[Any, list[int]]] = {}
    for index, (run, entry) in enumerate(zip(runs, entries, strict=True)):
        if entry["final_dice_mean"] is None:
            continue
        epsilon = entry["epsilon"]
        if run.kind == "pooled":
            target = find_key(run.info.get("config", {}), "clinic_target_epsilon")
            if isinstance(target, int | float) and not isinstance(target, bool):
                epsilon = _finite_or_none(float(target))
        lines.setdefault(technique_label(run), {}).setdefault(epsilon, []).append(index)
    out = []
    for label, by_eps in lines.items():
        points = []
        for epsilon in sorted(by_eps, key=lambda e: math.inf if e is None else e):
            chosen = [entries[i] for i in by_eps[epsilon]]
            organs = sorted({o for e in chosen for o in e["organs"]})
            points.append({
                "epsilon": epsilon,
                "runs": [e["name"] for e in chosen],
                "seeds": [e["seed"] for e in chosen],
                "dice_mean": _spread([e["final_dice_mean"] for e in chosen]),
                "organs": {o: _spread([e["organs"].get(o, {}).get("final_dice")
                                       for e in chosen]) for o in organs},
            })
        out.append(json_safe({"label": label, "kind": runs[next(iter(by_eps.values()))[0]].kind,
                              "points": points}))
    return out


def summarize_runs(
    runs: Sequence[RunLog],
    target_dice: float | None = None,
    target_fraction: float | None = None,
) -> dict[str, Any]:
    """The whole summary.json object: target, one entry per run (input order), seed groups."""
    target, source = resolve_target(runs, target_dice, target_fraction)
    entries = [summarize_run(run, target) for run in runs]
    return {
        "target_dice": target,
        "target_source": source,
        "runs": entries,
        "groups": summarize_groups(runs, entries),
        "privacy_utility": privacy_utility(runs, entries),
    }
