"""Benchmark: FEDn's round overhead, from the round logs of real runs.

Usage: .venv/bin/python bench/bench_round_overhead.py [--demo-rounds 5] [--clients 2 4 8]
       [--rounds 3] [--toy-train-s 8.0] [--skip-demo] [--skip-scaling] [--keep DIR]

Overhead of round k = (round wall time - slowest client's compute) / round wall time.

- round wall time: the global ``round_seconds`` of rounds.csv (FEDn's round committed_at
  -> updated_at; whole seconds, see RESOLUTION below).
- a client's compute in round k: its train time in round k (``client_processing_seconds``,
  FEDn's own timing of the train callback, weights (de)serialisation included; falls back
  to the app's ``train_seconds``) plus its validate time of round k-1's model. A FEDn
  client handles its task stream in one thread, and the controller does not wait for
  validations before it starts the next round: round k-1's validation runs inside round
  k's wall time, before that client's round-k training. Round 1 has none.
- validate time is not in the round log of a normal run (neither ClinicApp nor FEDn log
  it), so the clients here run :class:`TimedApp`, which wraps the real app and adds
  ``validate_seconds`` to the validation metrics it reports.

A finer, second measure: ``round_exec_training_seconds`` is the combiner's own float
timing of the round (request -> aggregation start); its overhead over the slowest client
is printed too.

Scenarios: (a) the demo experiment (``demo_experiment``: 3 phantom clinics, U-Net levels
3 base 8, DP-SGD, 32^3 patches) with fewer rounds; goal: median overhead under 10 %.
(b) 2, 4 and 8 clients of tests/toy_clinic_app.py (numpy linear regression) whose train
call sleeps ``--toy-train-s``: sleeping clients do not compete for the 2 cores, so the
growth with the number of clients is FEDn's, not TensorFlow's CPU contention (8 TF
processes on 2 cores would measure the CPU, not the federation).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
TESTS = BENCH.parent / "tests"
INNER_APP_ENV = "BENCH_INNER_APP"
DEFAULT_INNER_APP = "fedseg_clinic.app:ClinicApp.from_environment"
TIMED_APP = "bench_round_overhead:TimedApp.from_environment"
TOY_APP = "toy_clinic_app:ToyApp.from_environment"
GLOBAL = "global"
RESOLUTION_S = 1.0  # FEDn's round timestamps are HTTP dates: whole seconds
GOAL = 0.10


class TimedApp:
    """The real clinic app (named by $BENCH_INNER_APP) with its validate call timed."""

    def __init__(self, inner: Any) -> None:
        """Wrap an app with ClinicApp's interface (train / validate)."""
        self.inner = inner

    @classmethod
    def from_environment(cls) -> TimedApp:
        """Build the inner app from its own factory, in this client's environment."""
        from fedseg_clinic.fedn_callback import resolve_factory

        return cls(resolve_factory(os.environ.get(INNER_APP_ENV, DEFAULT_INNER_APP))())

    def train(self, weights: list[Any], server_settings: dict[str, Any]
              ) -> tuple[list[Any], dict[str, Any]]:
        """The inner app's train, unchanged."""
        return self.inner.train(weights, server_settings)

    def validate(self, weights: list[Any]) -> dict[str, float]:
        """The inner app's metrics plus ``validate_seconds``."""
        tic = time.perf_counter()
        metrics = dict(self.inner.validate(weights))
        metrics["validate_seconds"] = time.perf_counter() - tic
        return metrics


@dataclasses.dataclass(frozen=True)
class RoundOverhead:
    """One round's timings (seconds) and overheads (fractions of the wall time)."""

    round: int
    wall_s: float
    combiner_s: float
    slowest_compute_s: float
    slowest_client: str

    @property
    def overhead(self) -> float:
        """(wall - slowest compute) / wall."""
        return (self.wall_s - self.slowest_compute_s) / self.wall_s if self.wall_s > 0 \
            else math.nan

    @property
    def combiner_overhead(self) -> float:
        """The same with the combiner's float-precision round time."""
        return (self.combiner_s - self.slowest_compute_s) / self.combiner_s \
            if self.combiner_s > 0 else math.nan


def round_overheads(run_dir: Path) -> list[RoundOverhead]:
    """Per-round overhead from a run folder's rounds.csv (see the module docstring)."""
    from fedseg.orchestration.runlog import pivot, read_rounds

    table = pivot(read_rounds(run_dir))
    rounds = sorted({k for k, _ in table})
    clients = sorted({c for _, c in table if c != GLOBAL})
    out = []
    for k in rounds:
        glob = table.get((k, GLOBAL), {})
        compute: dict[str, float] = {}
        for client in clients:
            row = table.get((k, client), {})
            train = row.get("client_processing_seconds", row.get("train_seconds", math.nan))
            prev_val = table.get((k - 1, client), {}).get("validate_seconds", 0.0)
            if math.isfinite(train):
                compute[client] = train + (prev_val if math.isfinite(prev_val) else 0.0)
        slowest = max(compute, key=compute.__getitem__) if compute else "-"
        out.append(RoundOverhead(
            round=k, wall_s=glob.get("round_seconds", math.nan),
            combiner_s=glob.get("round_exec_training_seconds", math.nan),
            slowest_compute_s=compute.get(slowest, math.nan), slowest_client=slowest))
    return out


def client_pythonpath() -> str:
    """Client processes import TimedApp (bench/) and the toy app (tests/)."""
    return os.pathsep.join([str(BENCH), str(TESTS), os.environ.get("PYTHONPATH", "")])


def demo_run(runs_dir: Path, rounds: int) -> tuple[Path, float]:
    """Run the demo experiment with timed validation; (run folder, total seconds)."""
    from fedseg.orchestration.experiment import ClientsSpec, with_overrides
    from fedseg.orchestration.runner import demo_experiment, run_experiment

    exp = demo_experiment(rounds=rounds)
    clients = ClientsSpec(route=exp.clients.route, app=TIMED_APP,
                          env={**exp.clients.env, "PYTHONPATH": client_pythonpath(),
                               INNER_APP_ENV: DEFAULT_INNER_APP})
    exp = with_overrides(exp, clients=clients)
    tic = time.monotonic()
    result = run_experiment(exp, runs_dir)
    if result.status != "finished":
        raise RuntimeError(f"demo run {result.status}: {result.failures}")
    return result.run_dir, time.monotonic() - tic


def toy_run(runs_dir: Path, n_clients: int, rounds: int, train_s: float) -> tuple[Path, float]:
    """Run n toy clients (train sleeps train_s) for rounds; (run folder, total seconds)."""
    from fedseg.orchestration.experiment import parse_experiment
    from fedseg.orchestration.network.ports import free_port
    from fedseg.orchestration.runner import run_experiment

    data = runs_dir / f"toy-data-{n_clients}"
    names = [f"clinic-{i + 1}" for i in range(n_clients)]
    for name in names:
        (data / name).mkdir(parents=True, exist_ok=True)
        (data / name / "manifest.json").write_text("{}")
    doc = {
        "name": f"toy-{n_clients}", "seed": 3,
        "data": {"clinics": {n: str(data / n) for n in names}},
        "seed_builder": "toy_clinic_app:build_seed",
        "session": {"rounds": rounds, "round_timeout": 120, "min_clients": n_clients},
        "clients": {"app": TIMED_APP,
                    "env": {"PYTHONPATH": client_pythonpath(), INNER_APP_ENV: TOY_APP,
                            "TOY_TRAIN_SLEEP_S": str(train_s)}},
        "network": {"api_port": free_port(), "s3_port": free_port(),
                    "combiners": [{"name": "combiner-1", "port": free_port()}]},
    }
    exp = parse_experiment(doc, source=f"bench toy {n_clients} clients")
    tic = time.monotonic()
    result = run_experiment(exp, runs_dir, ready_timeout_s=240.0)
    if result.status != "finished" or result.failures:
        raise RuntimeError(f"toy run {n_clients}: {result.status} {result.failures}")
    return result.run_dir, time.monotonic() - tic


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f} %"


def pooled(rows: list[RoundOverhead]) -> tuple[float, float]:
    """Overhead of the summed rounds, 1 - sum(compute) / sum(wall), and its 1-sd error.

    Each whole-second wall time is end - start of two truncated stamps: its error is
    triangular on (-1, 1) s with mean 0 and sd sqrt(2/12) = 0.41 s, so sums over rounds
    are unbiased and their error grows only as sqrt(rounds).
    """
    wall = sum(r.wall_s for r in rows)
    compute = sum(r.slowest_compute_s for r in rows)
    if not wall > 0:
        return math.nan, math.nan
    return 1.0 - compute / wall, RESOLUTION_S * math.sqrt(2.0 / 12.0 * len(rows)) / wall


def print_rounds(title: str, rows: list[RoundOverhead]) -> None:
    """Markdown table of one run's rounds."""
    print(f"\n{title}\n")
    print("| round | wall s (1 s res.) | combiner s | slowest client compute s | client "
          "| overhead | combiner overhead |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.round} | {r.wall_s:.0f} | {r.combiner_s:.2f} | {r.slowest_compute_s:.2f} "
              f"| {r.slowest_client} | {_pct(r.overhead)} | {_pct(r.combiner_overhead)} |")
    wall = [r.overhead for r in rows if not math.isnan(r.overhead)]
    comb = [r.combiner_overhead for r in rows if not math.isnan(r.combiner_overhead)]
    if wall:
        # A whole-second wall time is off by up to 1 s: the overhead by up to 1/wall.
        bound = max(RESOLUTION_S / r.wall_s for r in rows if r.wall_s > 0)
        total, sd = pooled(rows)
        print(f"\nmedian overhead {_pct(statistics.median(wall))} "
              f"(1 s stamps: up to +-{_pct(bound)} per round); summed rounds "
              f"{_pct(total)} +- {_pct(sd)} (1 sd); combiner timing median "
              f"{_pct(statistics.median(comb)) if comb else '-'}")


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--toy-train-s", type=float, default=8.0)
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the run folders under this folder")
    args = parser.parse_args(argv)
    # fedn's package builder logs every file at DEBUG to stdout, and importing fedn sets
    # its logger to DEBUG: import it first, then quieten it, to keep the tables readable.
    import fedn.common.log_config  # noqa: F401

    logging.getLogger("fedn").setLevel(logging.WARNING)
    # The orchestrating process builds the toy seed itself (toy_clinic_app:build_seed).
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    root = Path(tempfile.mkdtemp(prefix="bench-round-overhead-")) if args.keep is None \
        else args.keep.resolve()
    root.mkdir(parents=True, exist_ok=True)
    print(f"load average at start {os.getloadavg()[0]:.2f} (1 min); runs in {root}")
    try:
        if not args.skip_demo:
            run_dir, total = demo_run(root / "demo", args.demo_rounds)
            rows = round_overheads(run_dir)
            print_rounds(f"(a) demo experiment, {args.demo_rounds} rounds, 3 clinics "
                         f"(run {total:.0f} s)", rows)
            med = statistics.median(r.overhead for r in rows)
            total, sd = pooled(rows)
            print(f"goal median < {GOAL:.0%}: {'met' if med < GOAL else 'NOT met'} by the "
                  f"median; {'met' if total + 2 * sd < GOAL else 'not shown'} by the summed "
                  "rounds (2 sd)")
        if not args.skip_scaling:
            summary = []
            for n in args.clients:
                run_dir, total = toy_run(root / "toy", n, args.rounds, args.toy_train_s)
                rows = round_overheads(run_dir)
                print_rounds(f"(b) toy app, {n} clients, train sleeps {args.toy_train_s} s "
                             f"(run {total:.0f} s)", rows)
                summary.append((n, rows, total))
            print(f"\n(b) summary: toy clients, {args.rounds} rounds, train "
                  f"{args.toy_train_s} s; means over the rounds\n")
            print("| clients | wall s | combiner s | slowest compute s | overhead s (wall) "
                  "| overhead s (combiner) | overhead, summed rounds | run s |")
            print("|---|---|---|---|---|---|---|---|")
            for n, rows, total in summary:
                wall = statistics.fmean(r.wall_s for r in rows)
                comb = statistics.fmean(r.combiner_s for r in rows)
                compute = statistics.fmean(r.slowest_compute_s for r in rows)
                over, sd = pooled(rows)
                print(f"| {n} | {wall:.2f} | {comb:.2f} | {compute:.2f} | {wall - compute:.2f} "
                      f"| {comb - compute:.2f} | {_pct(over)} +- {_pct(sd)} | {total:.0f} |")
        print(f"\nload average at end {os.getloadavg()[0]:.2f} (1 min)")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
