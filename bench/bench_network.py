"""Benchmark: how long ``network_up`` and ``network_down`` take.

Usage: .venv/bin/python bench/bench_network.py [--repeats 3]

Scenarios: SQLite + moto (one combiner), SQLite + moto with two combiners,
auth and hooks, managed PostgreSQL on its first start (initdb included) and on
a restart of the same data folder. Prints a Markdown table (median and range
over the repeats) to paste into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fedseg.orchestration.network import CombinerSpec, NetworkConfig, network_down, network_up
from fedseg.orchestration.network.ports import free_ports
from fedseg.orchestration.network.stores import find_postgres_bindir


def config_for(root: Path, scenario: str) -> NetworkConfig:
    api, s3, pg, hooks, c1, c2 = free_ports(6)
    combiners = [CombinerSpec("combiner-1", c1)]
    if scenario == "sqlite-2comb-auth-hooks":
        combiners.append(CombinerSpec("combiner-2", c2))
    config = NetworkConfig(root=root, api_port=api, s3_port=s3, postgres_port=pg,
                           hooks_port=hooks, combiners=combiners, api_workers=1,
                           statestore="postgres-managed" if scenario.startswith("postgres")
                           else "sqlite",
                           auth=scenario == "sqlite-2comb-auth-hooks",
                           hooks=scenario == "sqlite-2comb-auth-hooks")
    config.validate()
    return config


def time_once(root: Path, scenario: str) -> tuple[float, float]:
    config = config_for(root, scenario)
    t0 = time.perf_counter()
    network_up(config)
    up_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    network_down(root)
    return up_s, time.perf_counter() - t0


def main() -> None:
    """Run the scenarios and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    scenarios = ["sqlite", "sqlite-2comb-auth-hooks"]
    if find_postgres_bindir() is not None:
        scenarios += ["postgres-first-start", "postgres-restart"]
    else:
        print("PostgreSQL binaries absent: PostgreSQL scenarios skipped", file=sys.stderr)
    rows = []
    for scenario in scenarios:
        ups, downs = [], []
        for _ in range(args.repeats):
            # /tmp itself: the postgres user must be able to enter the folder.
            root = Path(tempfile.mkdtemp(prefix="fedseg-bench-", dir="/tmp"))
            os.chmod(root, 0o755)
            try:
                if scenario == "postgres-restart":
                    time_once(root, scenario)  # initdb here; timed below is a restart
                up_s, down_s = time_once(root, scenario)
                ups.append(up_s)
                downs.append(down_s)
            finally:
                shutil.rmtree(root, ignore_errors=True)
        rows.append((scenario, ups, downs))
    print("| scenario | network_up s (median, min-max) | network_down s (median) |")
    print("|---|---|---|")
    for scenario, ups, downs in rows:
        print(f"| {scenario} | {statistics.median(ups):.1f} ({min(ups):.1f}-{max(ups):.1f}) "
              f"| {statistics.median(downs):.1f} |")


if __name__ == "__main__":
    main()
