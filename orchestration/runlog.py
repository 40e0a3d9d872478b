"""The round log: what a federated run leaves behind.

``runs/<name>/rounds.csv`` is a long-format table with the header
``round,client,metric,value``: one row per (round, client, metric), where ``client`` is a
client name or ``"global"`` (server-side numbers: round timings, aggregated means).
Metric names use one vocabulary, listed in docs/experiments.md (train_loss, val_dice_mean,
val_dice_<organ>, val_hd95_<organ>, num_examples, n_val, epsilon, delta,
noise_multiplier, l2_norm_clip, train_seconds, round_seconds, ...). NaN is written as
``nan`` and means "not measured for this client" (e.g. an organ the clinic does not
contour).

``runs/<name>/run.json`` holds the config snapshot, seed, package versions, timings and
global model ids. ``runs/<name>/models/`` holds the global weights of every round.

Every write replaces the file atomically, so an interrupted run leaves a log that is
complete up to its last finished round and always readable.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.io import atomic_write_text, read_json_object

ROUNDS_NAME = "rounds.csv"
RUN_NAME = "run.json"
MODELS_DIR = "models"
HEADER = ("round", "client", "metric", "value")
GLOBAL = "global"


@dataclasses.dataclass(frozen=True)
class RoundRecord:
    """One row of rounds.csv."""

    round: int
    client: str
    metric: str
    value: float


def _format_value(value: float) -> str:
    return "nan" if math.isnan(value) else repr(float(value))


def records_to_csv(records: Iterable[RoundRecord]) -> str:
    """Serialise records (header first) as CSV text."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(HEADER)
    for rec in records:
        writer.writerow((rec.round, rec.client, rec.metric, _format_value(rec.value)))
    return buffer.getvalue()


def write_rounds(run_dir: Path, records: Iterable[RoundRecord]) -> Path:
    """Write the whole rounds.csv atomically (records sorted by round, client, metric)."""
    ordered = sorted(records, key=lambda r: (r.round, r.client != GLOBAL, r.client, r.metric))
    path = run_dir / ROUNDS_NAME
    atomic_write_text(path, records_to_csv(ordered))
    return path


def append_rounds(run_dir: Path, new: Iterable[RoundRecord]) -> Path:
    """Add records to rounds.csv (rewritten atomically; a (round, client, metric) is replaced)."""
    path = run_dir / ROUNDS_NAME
    existing = read_rounds(run_dir) if path.exists() else []
    merged = {(r.round, r.client, r.metric): r for r in existing}
    for rec in new:
        merged[(rec.round, rec.client, rec.metric)] = rec
    return write_rounds(run_dir, merged.values())


def read_rounds(run_dir: Path) -> list[RoundRecord]:
    """Read rounds.csv; a malformed file raises FedsegError naming file and line."""
    path = run_dir / ROUNDS_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FedsegError(f"{path}: no round log (not a run folder?)") from None
    except OSError as exc:
        raise FedsegError(f"{path}: cannot read ({exc.strerror})") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise FedsegError(f"{path}: empty round log (no header)")
    if tuple(h.strip() for h in header) != HEADER:
        raise FedsegError(f"{path}: header must be {','.join(HEADER)}, got {','.join(header)}")
    records = []
    for line_no, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != len(HEADER):
            raise FedsegError(f"{path}:{line_no}: expected 4 fields, got {len(row)}")
        try:
            records.append(RoundRecord(int(row[0]), row[1], row[2], float(row[3])))
        except ValueError:
            raise FedsegError(f"{path}:{line_no}: bad round or value in {row!r}") from None
    return records


def pivot(records: Iterable[RoundRecord]) -> dict[tuple[int, str], dict[str, float]]:
    """Group records as {(round, client): {metric: value}}."""
    table: dict[tuple[int, str], dict[str, float]] = {}
    for rec in records:
        table.setdefault((rec.round, rec.client), {})[rec.metric] = rec.value
    return table


def write_run_info(run_dir: Path, info: dict[str, Any]) -> Path:
    """Write run.json atomically (config snapshot, seed, versions, timings, model ids)."""
    path = run_dir / RUN_NAME
    atomic_write_text(path, json.dumps(info, indent=2, sort_keys=True, default=str))
    return path


def read_run_info(run_dir: Path) -> dict[str, Any]:
    """Read run.json; a missing or malformed file raises FedsegError naming it."""
    path = run_dir / RUN_NAME
    return read_json_object(path, "run info", missing=f"{path}: missing (not a run folder?)")
