"""Soak: many rounds of a tiny model through a real local FEDn network; leaks show as slopes.

Usage: .venv/bin/python bench/bench_soak.py [--rounds 100] [--every 5] [--clients 2]
       [--keep DIR] [--json OUT]

The run is an ordinary ``run_experiment`` of tests/toy_clinic_app.py (numpy linear
regression: the rounds cost FEDn's plumbing, not training) on a network the run starts
for itself (SQLite state store, moto S3, one combiner, the API server). Every ``--every``
rounds (and at round 1 and the last round) it samples, per role, the resident memory
(RSS, MB) and the open file descriptors (psutil ``num_fds``: files, sockets and pipes)
of the process and all its children:

- ``api`` (FEDn's API server), ``combiner-N``, ``s3`` (the moto server) and any other
  process the network records (the network's own ``network.json``);
- each client process (the run's ``clients.json``);
- ``runner``: this process, which drives the session and writes the round log.

It prints first vs last and the least-squares slopes per 10 rounds of each series, over
the first and over the second half of the rounds.

Verdict (exit code 0 "flat", 1 "growing", 2 the run itself did not finish). The first
half of the rounds is warm-up: imports, caches, connection pools and the allocator's
high water settle there (the API server grows for its first ~90 rounds, then levels).
Only the **second half** (samples after round N/2, at least 3 of them) is judged:

- memory grows when its least-squares RSS slope over the second half exceeds
  ``--rss-tolerance-mb`` per 100 rounds (default 10 MB, i.e. 0.1 MB a round);
- file handles grow when their second-half slope exceeds 0.1 per 10 rounds *and* the
  last sample is more than 2 above the second half's first sample.

A leak proportional to the rounds shows in both halves; a warm-up that levels off shows
in the first only. So run enough rounds (100 or more) for the second half to be steady.

The network and the clients are stopped (by their recorded pids) when the bench ends in
any way: finished, failed, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
TESTS = BENCH.parent / "tests"
TOY_APP = "toy_clinic_app:ToyApp.from_environment"


@dataclass
class Series:
    """One role's samples: round number, RSS in MB, open descriptors."""

    role: str
    rounds: list[int] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # since the session's first round
    heap_used_mb: list[float] = field(default_factory=list)  # runner only (glibc)
    heap_free_mb: list[float] = field(default_factory=list)
    pymalloc_arenas_mb: list[float] = field(default_factory=list)  # runner only
    pymalloc_live_mb: list[float] = field(default_factory=list)

    def half(self, last_round: int, second: bool) -> tuple[list[int], list[float], list[float]]:
        """(rounds, RSS, fds) of the samples in the first or second half of the rounds."""
        keep = [i for i, r in enumerate(self.rounds) if (r > last_round / 2) == second]
        return ([self.rounds[i] for i in keep], [self.rss_mb[i] for i in keep],
                [float(self.fds[i]) for i in keep])


def tree_usage(pid: int, create_time: float | None = None) -> tuple[float, int] | None:
    """RSS (MB) and open fds of a process and its children; None when it is gone."""
    try:
        root = psutil.Process(pid)
        if create_time is not None and abs(root.create_time() - create_time) > 1.0:
            return None  # the pid was reused: not our process any more
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    rss, fds = 0, 0
    for proc in procs:
        try:
            rss += proc.memory_info().rss
            fds += proc.num_fds()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return rss / 2**20, fds


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def malloc_mb(trim: bool = False) -> tuple[float, float] | None:
    """glibc's view of this process's heap: (MB in use, MB free but kept); None off glibc.

    In use growing = memory really held (a leak, or data kept on purpose); only the free
    part growing = fragmentation / high water that ``malloc_trim`` could give back.
    ``trim`` calls ``malloc_trim(0)`` first.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    if trim:
        libc.malloc_trim(0)
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20, info.fordblks / 2**20


def pymalloc_mb() -> tuple[float, float]:
    """Python's small-object allocator: (MB of arenas, MB of live blocks in them).

    pymalloc's arenas are mmapped, outside glibc's heap: Python objects that leave
    arenas partly used (fragmentation) grow the RSS but neither tracemalloc's count of
    live objects nor glibc's heap.
    """
    with tempfile.TemporaryFile() as out:
        saved = os.dup(2)
        os.dup2(out.fileno(), 2)  # sys._debugmallocstats writes to the C stderr
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read().decode(errors="replace")

    def number(label: str) -> float:
        for line in text.splitlines():
            if line.startswith(label):
                return float(line.split("=")[-1].replace(",", "").strip())
        return math.nan

    return (number("# arenas allocated current"),  # 1 MiB each (CPython 3.10+)
            number("# bytes in allocated blocks") / 2**20)


def sample(run_dir: Path) -> dict[str, tuple[float, int]]:
    """Usage of every recorded process of the run (network, clients, this runner)."""
    from fedseg.orchestration import clients as clients_mod

    out: dict[str, tuple[float, int]] = {}
    network_file = run_dir / "network" / "network.json"
    if network_file.is_file():
        records = json.loads(network_file.read_text()).get("records", {})
        for name, rec in records.items():
            usage = tree_usage(int(rec["pid"]), float(rec["create_time"]))
            if usage is not None:
                out["s3" if name == "moto" else name] = usage
    for handle in clients_mod.load_clients(run_dir):
        usage = tree_usage(handle.record.pid, handle.record.create_time)
        if usage is not None:
            out[f"client {handle.name}"] = usage
    # This process alone: its children are the network and the clients, counted above.
    me = psutil.Process()
    out["runner"] = (me.memory_info().rss / 2**20, me.num_fds())
    return out


def slope_per_10(xs: list[int], ys: list[float]) -> float:
    """Least-squares slope of ys over xs, per 10 rounds (0 with fewer than 2 points)."""
    if len(xs) < 2:
        return 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    cov = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    return 0.0 if den == 0 else 10 * cov / den


def write_experiment(folder: Path, rounds: int, n_clients: int) -> dict[str, Any]:
    """The toy experiment document (one empty clinic folder per client)."""
    from fedseg.orchestration.network.ports import free_port
    from fedseg_clinic.cases import FORMAT_VERSION

    names = [f"clinic-{i + 1}" for i in range(n_clients)]
    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
        # An empty but valid manifest: the runner checks every clinic's organ set.
        (folder / name / "manifest.json").write_text(json.dumps(
            {"clinic": name, "cases": [], "format_version": FORMAT_VERSION}))
    pythonpath = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {
        "name": "soak", "seed": 3,
        "data": {"clinics": {n: str(folder / n) for n in names}},
        "seed_builder": "toy_clinic_app:build_seed",
        "client_settings": {"learning_rate": [0.05] * rounds, "local_steps": 3},
        "session": {"rounds": rounds, "round_timeout": 60, "min_clients": n_clients},
        "clients": {"app": TOY_APP, "env": {"PYTHONPATH": pythonpath}},
        "network": {"api_port": free_port(), "s3_port": free_port(),
                    "combiners": [{"name": "combiner-1", "port": free_port()}]},
    }


def soak(workdir: Path, rounds: int, every: int, n_clients: int, trim: bool = False
         ) -> tuple[dict[str, Series], Any, float]:
    """Run the soak; (series per role, run result, wall seconds)."""
    from fedseg.orchestration.experiment import parse_experiment
    from fedseg.orchestration.runner import run_experiment

    sys.path.insert(0, str(TESTS))  # the seed builder is imported in this process too
    exp = parse_experiment(write_experiment(workdir / "data", rounds, n_clients),
                           source="bench soak")
    run_dir = workdir / "runs" / "soak"
    series: dict[str, Series] = {}
    seen: set[int] = set()
    started: dict[str, float] = {}

    def progress(line: str) -> None:
        # "round k/N  ..." lines come after round k is logged: sample once per round k.
        if not line.startswith("round "):
            return
        try:
            k = int(line.split()[1].split("/")[0])
        except (IndexError, ValueError):
            return
        if k in seen:
            return
        seen.add(k)
        if k == 1 or k % every == 0 or k == rounds:
            now = time.monotonic()
            started.setdefault("t", now)
            heap = malloc_mb(trim)  # before sample(): with trim, RSS is measured trimmed
            arenas = pymalloc_mb()
            for role, (rss, fds) in sample(run_dir).items():
                s = series.setdefault(role, Series(role))
                s.rounds.append(k)
                s.rss_mb.append(rss)
                s.fds.append(fds)
                s.seconds.append(now - started["t"])
                if role == "runner" and heap is not None:
                    s.heap_used_mb.append(heap[0])
                    s.heap_free_mb.append(heap[1])
                if role == "runner":
                    s.pymalloc_arenas_mb.append(arenas[0])
                    s.pymalloc_live_mb.append(arenas[1])
            print(f"  sampled round {k} ({time.strftime('%H:%M:%S')})", flush=True)

    tic = time.monotonic()
    try:
        result = run_experiment(exp, workdir / "runs", progress=progress,
                                ready_timeout_s=240.0)
    finally:
        stop_everything(run_dir)
    return series, result, time.monotonic() - tic


def stop_everything(run_dir: Path) -> None:
    """Stop the run's clients and network by their recorded pids (whatever is left).

    run_experiment stops them itself on a normal end and on KeyboardInterrupt; this is
    the bench's own guarantee (an interrupted bench once left moto and hooks running),
    done with SIGINT and SIGTERM ignored so that a second signal cannot cut it short.
    """
    from fedseg.orchestration.runner import stop_leftovers

    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT,
                                                                     signal.SIGTERM)}
    try:
        if run_dir.exists():
            stopped = stop_leftovers(run_dir)
            if stopped:
                print(f"stopped what was left running: {', '.join(stopped)}", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def verdict(series: dict[str, Series], last_round: int, rss_tolerance_mb: float
            ) -> list[str]:
    """The series that grow in the second half of the rounds (module doc); [] when flat."""
    growing = []
    for s in series.values():
        xs, rss, fds = s.half(last_round, second=True)
        if len(xs) < 3:
            continue
        rss_slope = slope_per_10(xs, rss)
        if rss_slope * 10 > rss_tolerance_mb:
            growing.append(f"{s.role} RSS {rss_slope:+.2f} MB/10 rounds (second half)")
        if fds[-1] > fds[0] + 2 and slope_per_10(xs, fds) > 0.1:
            growing.append(f"{s.role} fds {fds[0]:.0f} -> {fds[-1]:.0f} (second half)")
    return growing


def main(argv: list[str] | None = None) -> int:
    """Run the soak and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--every", type=int, default=5, help="sample every N rounds")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rss-tolerance-mb", type=float, default=10.0,
                        help="allowed RSS growth per 100 rounds per role (MB)")
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temp)")
    parser.add_argument("--json", type=Path, help="write the samples here")
    parser.add_argument("--malloc-trim", action="store_true",
                        help="malloc_trim(0) in the runner before each sample (diagnosis: "
                             "is its RSS growth memory glibc could give back?)")
    args = parser.parse_args(argv)

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM like Ctrl-C: run_experiment and soak clean up

    signal.signal(signal.SIGTERM, interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="fedseg-soak-") as tmp:
            workdir = (args.keep or Path(tmp)).resolve()
            workdir.mkdir(parents=True, exist_ok=True)
            series, result, wall = soak(workdir, args.rounds, args.every, args.clients,
                                        args.malloc_trim)
    except KeyboardInterrupt:
        print("interrupted; the network and clients were stopped", file=sys.stderr)
        return 130
    print(f"run: {result.status}, {args.rounds} rounds x {args.clients} clients, "
          f"{wall:.0f} s wall ({wall / max(args.rounds, 1):.2f} s/round), "
          f"{len(result.failures)} failures")
    print("| process | RSS MB first -> last | RSS slope MB/10 rounds, 1st half / 2nd half "
          "| fds first -> last | fds slope /10 rounds, 2nd half |")
    print("|---|---|---|---|---|")
    for s in sorted(series.values(), key=lambda s: s.role):
        x1, r1, _ = s.half(args.rounds, second=False)
        x2, r2, f2 = s.half(args.rounds, second=True)
        print(f"| {s.role} (rounds {s.rounds[0]}-{s.rounds[-1]}) | {s.rss_mb[0]:.0f} -> "
              f"{s.rss_mb[-1]:.0f} | {slope_per_10(x1, r1):+.2f} / {slope_per_10(x2, r2):+.2f} "
              f"| {s.fds[0]} -> {s.fds[-1]} | {slope_per_10(x2, f2):+.2f} |")
    runner = series.get("runner")
    if runner is not None and len(runner.rounds) >= 3:
        mid = len(runner.rounds) // 2
        (r0, t0), (rm, tm), (r1, t1) = ((runner.rounds[i], runner.seconds[i])
                                        for i in (0, mid, -1))
        print(f"seconds per round: rounds {r0}-{rm} {(tm - t0) / max(rm - r0, 1):.2f}, "
              f"rounds {rm}-{r1} {(t1 - tm) / max(r1 - rm, 1):.2f}")
    if runner is not None and len(runner.heap_used_mb) >= 3:
        xs = runner.rounds[:len(runner.heap_used_mb)]
        x2 = [x for x in xs if x > args.rounds / 2]
        used2 = runner.heap_used_mb[len(xs) - len(x2):]
        print(f"runner heap (glibc malloc{', trimmed' if args.malloc_trim else ''}): in use "
              f"{runner.heap_used_mb[0]:.1f} -> {runner.heap_used_mb[-1]:.1f} MB "
              f"(2nd half {slope_per_10(x2, used2):+.2f} MB/10 rounds), free but kept "
              f"{runner.heap_free_mb[0]:.1f} -> {runner.heap_free_mb[-1]:.1f} MB")
    if runner is not None and len(runner.pymalloc_arenas_mb) >= 3:
        print(f"runner pymalloc: arenas {runner.pymalloc_arenas_mb[0]:.0f} -> "
              f"{runner.pymalloc_arenas_mb[-1]:.0f} MB, live blocks "
              f"{runner.pymalloc_live_mb[0]:.1f} -> {runner.pymalloc_live_mb[-1]:.1f} MB")
    if args.json:
        args.json.write_text(json.dumps({k: vars(v) for k, v in series.items()}, indent=1))
    if result.status != "finished":
        print(f"the run did not finish: {result.status}")
        return 2
    growing = verdict(series, args.rounds, args.rss_tolerance_mb)
    print("flat" if not growing else "growing: " + "; ".join(growing))
    return 0 if not growing else 1


if __name__ == "__main__":
    sys.exit(main())
