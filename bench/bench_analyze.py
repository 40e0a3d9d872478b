"""Benchmark: `fedseg analyze` on synthetic round logs of growing size.

Prints a table: rounds x clients, rows in rounds.csv, seconds to load + summarise one
run, seconds to write the whole report (3 runs: two federated + one pooled).
Run: .venv/bin/python bench/bench_analyze.py
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

from fedseg.analysis import report, summary
from fedseg.orchestration.runlog import RoundRecord, write_rounds, write_run_info
from fedseg_clinic.organs import ORGANS


def make_log(run_dir: Path, rounds: int, clients: int, kind: str = "federated") -> int:
    records = []
    for rnd in range(1, rounds + 1):
        records += [RoundRecord(rnd, "global", "round_seconds", 30.0),
                    RoundRecord(rnd, "global", "aggregation_seconds", 1.0)]
        for c in range(clients):
            name = f"clinic_{c}"
            dice = 1.0 - math.exp(-rnd / 20) - 0.01 * c
            metrics = {"val_dice_mean": dice, "n_val": 4.0, "train_loss": 1.0 / rnd,
                       "val_loss": 1.1 / rnd, "epsilon": 0.2 * math.sqrt(rnd),
                       "train_seconds": 20.0, "validate_seconds": 3.0, "num_examples": 40.0}
            for organ in ORGANS:
                metrics[f"val_dice_{organ}"] = math.nan if c % 3 == 0 and organ == "esophagus" \
                    else dice
                metrics[f"val_hd95_{organ}"] = 10.0 / rnd
            records += [RoundRecord(rnd, name, k, v) for k, v in metrics.items()]
    run_dir.mkdir(parents=True)
    write_rounds(run_dir, records)
    write_run_info(run_dir, {"name": run_dir.name, "kind": kind, "seed": 0, "config": {}})
    return len(records)


def main() -> None:
    print("| rounds x clients | rows | load + summary (s) | report, 3 runs (s) |")
    print("|---|---|---|---|")
    for rounds, clients in ((10, 3), (50, 5), (200, 10)):
        with tempfile.TemporaryDirectory() as tmp:
            base = Path(tmp)
            rows = make_log(base / "a", rounds, clients)
            make_log(base / "b", rounds, clients)
            make_log(base / "pooled", rounds, 1, kind="pooled")
            started = time.perf_counter()
            summary.summarize_run(summary.load_run(base / "a"), target=0.8)
            load_s = time.perf_counter() - started
            started = time.perf_counter()
            report.write_report([base / "a", base / "b", base / "pooled"], base / "out",
                                target_fraction=0.9)
            report_s = time.perf_counter() - started
        print(f"| {rounds} x {clients} | {rows} | {load_s:.2f} | {report_s:.2f} |")


if __name__ == "__main__":
    main()
