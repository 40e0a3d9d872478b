"""Benchmark: callback route vs package route, same experiment, real FEDn processes.

Runs one tiny DP experiment (2 phantom clinics, 2-level U-Net, 16^3 patches, 3 rounds)
once per client route on a fresh local network each, and prints a table: time to
connect the clients, session time, mean round time, and the mean time fedn measured
for one train call at a clinic, and the package route's mean round over the callback
route's (the goal: at most 1.2).

Routes: ``callback`` (one long-lived process per clinic), ``package`` (``fedn client
start`` running the compute package; its ``startup`` entry point starts a warm worker
that train/validate hand their jobs to) and, with ``--cold``, ``package-cold`` (the
same with FEDSEG_WARM_WORKER=0: every call a fresh Python + TensorFlow, model build and
first traced step - how the package route ran before the warm worker).

    .venv/bin/python bench/bench_client_routes.py [--rounds 3] [--cold] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

from fedseg.orchestration.experiment import parse_experiment
from fedseg.orchestration.network.ports import free_port
from fedseg.orchestration.runlog import GLOBAL, read_rounds, read_run_info
from fedseg.orchestration.runner import run_experiment


def _experiment(route: str, rounds: int) -> Any:
    env = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    if route == "package-cold":
        env["FEDSEG_WARM_WORKER"] = "0"
    return parse_experiment({
        "name": f"routes-{route}", "seed": 1,
        "data": {"phantoms": {"preset": "iid", "clinics": 2,
                              "options": {"patients": 3, "size": 32}}},
        "model": {"levels": 2, "base_filters": 4, "groups": 2},
        "clinic": {
            "training": {"learning_rate": 0.003, "local_steps": 2, "batch_size": 2,
                         "patch_size": [16, 16, 16]},
            "privacy": {"enabled": True, "noise_multiplier": 1.0, "l2_norm_clip": 1.0},
            "validation": {"patch_size": [16, 16, 16], "overlap": 0.0, "batch_size": 4},
        },
        "session": {"rounds": rounds, "round_timeout": 600, "min_clients": 2},
        "clients": {"route": route.split("-")[0], "env": env},
        "network": {"api_port": free_port(), "s3_port": free_port(),
                    "combiners": [{"name": "combiner-1", "port": free_port()}]},
    }, source=f"bench {route}")


def measure(route: str, rounds: int, out: Path) -> dict[str, float]:
    """Run the experiment on one route; return its timings."""
    result = run_experiment(_experiment(route, rounds), out, overwrite=True)
    if result.status != "finished":
        raise SystemExit(f"{route}: run ended {result.status}")
    info = read_run_info(result.run_dir)
    records = read_rounds(result.run_dir)
    by_round = {r.round: r.value for r in records
                if r.client == GLOBAL and r.metric == "round_seconds"}
    rounds_s = [by_round[k] for k in sorted(by_round)]
    train_s = [r.value for r in records if r.metric == "client_processing_seconds"]
    return {"clients_up": info["timings"]["clients_up_seconds"],
            "session": info["timings"]["session_seconds"],
            "round": statistics.mean(rounds_s), "train_call": statistics.mean(train_s),
            # Round 1 traces the DP step on both routes: the later rounds are the steady state.
            "later": statistics.mean(rounds_s[1:]) if len(rounds_s) > 1 else math.nan,
            "total": info["timings"]["total_seconds"]}


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cold", action="store_true",
                        help="also the package route without its warm worker (slow)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-routes-"))
    routes = ["callback", "package"] + (["package-cold"] if args.cold else [])
    rows = {route: measure(route, args.rounds, out.resolve()) for route in routes}
    print(f"| route | clients up s | session s ({args.rounds} rounds) | mean round s "
          "| x callback | mean round 2.. s | x callback | mean train call s | total s |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = rows["callback"]
    for route, r in rows.items():
        print(f"| {route} | {r['clients_up']:.1f} | {r['session']:.1f} | {r['round']:.1f} "
              f"| {r['round'] / base['round']:.2f} | {r['later']:.1f} "
              f"| {r['later'] / base['later']:.2f} | {r['train_call']:.2f} "
              f"| {r['total']:.1f} |")


if __name__ == "__main__":
    main()
