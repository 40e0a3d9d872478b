"""Benchmark: a FEDn network of several combiners and N clinics, each in its own namespace.

Usage: .venv/bin/python bench/bench_scale.py [--clients 1 5 10 20] [--combiners 3]
       [--rounds 3] [--train-s 3.0] [--keep DIR] [--models] [--skip-clinics]

(a) Clinics. For each N: a fresh network (API server, C combiners, SQLite, moto) on an
address that exists only on veth pairs made by the benchmark (fedseg.orchestration.netns),
so TLS and token auth are on as off loopback; N callback clients of the toy app
(tests/toy_clinic_app.py, numpy; its train call sleeps ``--train-s`` so that N clients do
not compete for the CPU and the growth measured is the federation's), clinic i in
namespace i, preferring combiner i mod C. A session of ``--rounds`` rounds, then records:

- round overhead = round wall time - the slowest client's compute (fedn's own timing of
  the train callback, ``client_processing_seconds``), three ways: fedn's round stamps
  (whole seconds), the combiners' float timing (request -> aggregation start, the
  slowest combiner), and the session's wall time measured here divided by the rounds;
- memory: peak RSS (sampled every 0.5 s) of the API server (gunicorn master + workers,
  summed: shared pages count twice), of each combiner, of the largest client;
- completeness: every clinic's update in every round (its training metadata in the round
  log, no failure), and the global model of each round aggregated from N updates.

(b) Model size (``--models``): the real clinic app (callback route) trains 1 local step on
tiny phantom patches for 2 clinics and 1 round, on loopback, with the demo-size model
(levels 3, base 8: 85k parameters) and a ~29M-parameter U-Net (levels 5, base 36):
round time, seed upload, model download, memory of each process.

The namespaces and the networks are removed at the end (also on failure or Ctrl-C).
Without the right to create namespaces the benchmark says so and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
TESTS = BENCH.parent / "tests"
TOY_APP = "toy_clinic_app:ToyApp.from_environment"
GLOBAL = "global"
SAMPLE_S = 0.5
MB = 1024 * 1024


# --- memory -------------------------------------------------------------------------------

def role_of(cmdline: list[str]) -> str | None:
    """Which part of the federation a process is, from its command line.

    Returns:
        "api", "combiner:<name>", "client:<name>", "s3" (moto), "hooks", or None (not ours).
    """
    text = " ".join(cmdline)
    if "fedseg.orchestration.fedn.launch" in text:
        if " api" in text:
            return "api"
        if " combiner" in text and "--name" in cmdline:
            return f"combiner:{cmdline[cmdline.index('--name') + 1]}"
        if " hooks" in text:
            return "hooks"
        if " client" in text:
            return "client:?"
    if "fedseg_clinic.fedn_callback" in text and "--name" in cmdline:
        return f"client:{cmdline[cmdline.index('--name') + 1]}"
    if "moto" in text:
        return "s3"
    return None


class MemorySampler:
    """Peak RSS per role of our child processes, sampled in a thread every SAMPLE_S.

    Per sample, processes of one role are summed (the API server's gunicorn workers are
    forked from its master and carry its command line); the peak of each role's sum over
    the samples is kept.
    """

    def __init__(self, interval_s: float = SAMPLE_S) -> None:
        """Not started yet (:meth:`start`)."""
        self.interval_s = interval_s
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> dict[str, float]:
        """One sample: role -> summed RSS in bytes; updates the peaks."""
        import psutil

        now: dict[str, float] = {}
        for proc in psutil.Process().children(recursive=True):
            try:
                role = role_of(proc.cmdline())
                rss = proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if role is not None:
                now[role] = now.get(role, 0.0) + rss
        for role, rss in now.items():
            self.peak[role] = max(self.peak.get(role, 0.0), rss)
        return now

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> MemorySampler:
        """Start sampling."""
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        """Stop; returns the peaks (bytes)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return dict(self.peak)


def memory_summary(peak: dict[str, float]) -> dict[str, float]:
    """Peaks in MB: api, combiner_max, combiner_mean, client_max, client_mean, s3."""
    combiners = [v for k, v in peak.items() if k.startswith("combiner:")]
    clients = [v for k, v in peak.items() if k.startswith("client:")]
    return {
        "api_mb": peak.get("api", math.nan) / MB,
        "combiner_max_mb": max(combiners) / MB if combiners else math.nan,
        "combiner_mean_mb": statistics.fmean(combiners) / MB if combiners else math.nan,
        "client_max_mb": max(clients) / MB if clients else math.nan,
        "client_mean_mb": statistics.fmean(clients) / MB if clients else math.nan,
        "s3_mb": peak.get("s3", math.nan) / MB,
    }


# --- rounds -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RoundCheck:
    """One round: timings (s) and who arrived."""

    round: int
    wall_s: float
    combiner_s: float
    slowest_compute_s: float
    updates_aggregated: float
    missing: tuple[str, ...]

    @property
    def overhead_s(self) -> float:
        """Whole-second round wall time minus the slowest client's compute."""
        return self.wall_s - self.slowest_compute_s

    @property
    def combiner_overhead_s(self) -> float:
        """The slowest combiner's float round time minus the slowest client's compute."""
        return self.combiner_s - self.slowest_compute_s


def slowest_combiner_s(rounds_answer: Any, session_id: str) -> dict[str, float]:
    """fedn round id -> the slowest combiner's ``time_exec_training`` in this session.

    The round log sums the combiners' times; with several combiners in parallel the
    round lasts as long as the slowest one.
    """
    out: dict[str, float] = {}
    result = rounds_answer.get("result", []) if isinstance(rounds_answer, dict) else []
    for raw in result:
        config = raw.get("round_config") or {}
        if isinstance(config, str):
            config = json.loads(config)
        if config.get("session_id") != session_id:
            continue
        times = [float(c.get("time_exec_training") or math.nan)
                 for c in raw.get("combiners") or []]
        out[str(raw.get("round_id"))] = max(times) if times else math.nan
    return out


def check_rounds(records: Iterable[Any], clients: list[str], rounds: int,
                 combiner_s: dict[int, float] | None = None) -> list[RoundCheck]:
    """Per round: timings and the clinics whose update is missing.

    Args:
        records: Round log rows (RoundRecord: round, client, metric, value).
        clients: Every clinic that should have sent an update each round.
        rounds: Rounds the session had.
        combiner_s: Round -> the slowest combiner's time (default: the log's, summed).

    A clinic is missing in a round when the log has no training metadata for it
    (``num_examples``) or marks it ``train_failed``; a round without all N updates in its
    global model (``updates_aggregated``) is incomplete too (see :func:`complete`).
    """
    table: dict[tuple[int, str], dict[str, float]] = {}
    for r in records:
        table.setdefault((r.round, r.client), {})[r.metric] = r.value
    out = []
    for k in range(1, rounds + 1):
        glob = table.get((k, GLOBAL), {})
        missing = tuple(c for c in clients
                        if "num_examples" not in table.get((k, c), {})
                        or table.get((k, c), {}).get("train_failed", 0.0) != 0.0)
        compute = [table[(k, c)]["client_processing_seconds"] for c in clients
                   if math.isfinite(table.get((k, c), {}).get("client_processing_seconds",
                                                               math.nan))]
        out.append(RoundCheck(
            round=k, wall_s=glob.get("round_seconds", math.nan),
            combiner_s=(combiner_s or {}).get(k, glob.get("round_exec_training_seconds",
                                                          math.nan)),
            slowest_compute_s=max(compute) if compute else math.nan,
            updates_aggregated=glob.get("updates_aggregated", math.nan), missing=missing))
    return out


def complete(checks: list[RoundCheck], n_clients: int) -> bool:
    """Every round has every clinic's update, all N aggregated into its global model."""
    return bool(checks) and all(not c.missing and c.updates_aggregated == n_clients
                                for c in checks)


# --- (a) clinics in namespaces ------------------------------------------------------------

def own_namespaces(pids: list[int]) -> bool:
    """Each process in a network namespace of its own, none in ours (/proc/PID/ns/net)."""
    ours = os.readlink("/proc/self/ns/net")
    theirs = [os.readlink(f"/proc/{pid}/ns/net") for pid in pids]
    return ours not in theirs and len(set(theirs)) == len(theirs)


@dataclasses.dataclass
class ScaleResult:
    """One N's measurement."""

    clients: int
    combiners: int
    rounds: list[RoundCheck]
    session_s: float
    connect_s: float
    up_s: float
    memory_mb: dict[str, float]
    per_combiner: dict[str, int]
    complete: bool
    separate_namespaces: bool = False

    def row(self) -> dict[str, Any]:
        """Means over the rounds, JSON-ready."""
        mean = statistics.fmean
        return {
            "clients": self.clients, "combiners": self.combiners,
            "rounds": len(self.rounds), "complete": self.complete,
            "wall_s": mean(r.wall_s for r in self.rounds),
            "combiner_s": mean(r.combiner_s for r in self.rounds),
            "compute_s": mean(r.slowest_compute_s for r in self.rounds),
            "overhead_s": mean(r.overhead_s for r in self.rounds),
            "combiner_overhead_s": mean(r.combiner_overhead_s for r in self.rounds),
            "session_overhead_s": self.session_s / len(self.rounds)
            - mean(r.slowest_compute_s for r in self.rounds),
            "session_s": self.session_s, "connect_s": self.connect_s, "up_s": self.up_s,
            "per_combiner": self.per_combiner,
            "separate_namespaces": self.separate_namespaces, **self.memory_mb,
        }


def _toy_seed(work: Path) -> Path:
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from toy_clinic_app import build_seed

    return build_seed({}, work / "seed.npz")


def scale_run(ns: Any, n_clients: int, n_combiners: int, rounds: int, train_s: float,
              work: Path, round_timeout: int = 120) -> ScaleResult:
    """One network, N namespaced clinics, one session; everything stopped afterwards.

    Args:
        ns: A :class:`fedseg.orchestration.netns.Netns` with at least N namespaces.
        n_clients: Clinics (clinic i runs in namespace i, prefers combiner i mod C).
        n_combiners: Combiners.
        rounds: Session rounds.
        train_s: Seconds the toy app's train call sleeps.
        work: Folder for the network, the clients and their data.
        round_timeout: fedn's round timeout.
    """
    from fedseg.orchestration import clients as clients_mod
    from fedseg.orchestration import collect
    from fedseg.orchestration import session as session_mod
    from fedseg.orchestration.fedn import compat as fedn_compat
    from fedseg.orchestration.network import (
        CombinerSpec,
        NetworkConfig,
        network_down,
        network_up,
        ports,
    )
    from fedseg.orchestration.network.ports import free_ports

    if n_clients > len(ns.names):
        raise ValueError(f"{n_clients} clinics need {n_clients} namespaces, have "
                         f"{len(ns.names)}")
    api_port, s3_port, pg_port, *comb = free_ports(3 + n_combiners)
    root = work / "network"
    config = NetworkConfig(root=root, api_port=api_port, s3_port=s3_port,
                           postgres_port=pg_port, host=ns.host_ip, startup_timeout_s=120,
                           combiners=[CombinerSpec(f"combiner-{i + 1}", p)
                                      for i, p in enumerate(comb)])
    config.validate()
    sampler = MemorySampler()
    tic = time.monotonic()
    state = network_up(config)
    up_s = time.monotonic() - tic
    handles: list[Any] = []
    try:
        sampler.start()
        api = state.api_client()
        package = session_mod.build_package(TESTS / "fednpkg_numpy", work / "package.tgz")
        seed_id = session_mod.upload_package_and_seed(api, package, _toy_seed(work), "scale")
        ca = Path(str(state.tls_ca))
        names = [f"clinic-{i + 1:02d}" for i in range(n_clients)]
        tic = time.monotonic()
        for i, name in enumerate(names):
            data = work / "data" / name
            data.mkdir(parents=True, exist_ok=True)
            (data / "manifest.json").write_text("{}")
            spec = clients_mod.ClientSpec(name, data, env={
                "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
                "TOY_TRAIN_SLEEP_S": str(train_s)})
            folder = clients_mod.client_folder(work, name)
            for sub in ("work", "state"):
                (folder / sub).mkdir(parents=True, exist_ok=True)
            token = state.fresh_token("client", f"clinic:{name}")
            client_id = clients_mod.new_client_id()
            combiner = f"combiner-{i % n_combiners + 1}"
            argv = ns.exec_argv(i, clients_mod.client_argv(
                "callback", spec, state.api_url, TOY_APP, folder, token, combiner, client_id))
            record = ports.spawn(name, argv, cwd=folder / "work", log=folder / "client.log",
                                 env=clients_mod.client_env(spec, folder, token, tls_ca=ca))
            handles.append(clients_mod.ClientHandle(name, "callback", folder, record,
                                                    client_id))
        clients_mod.wait_connected(handles, 60.0 + 6.0 * n_clients, api)
        connect_s = time.monotonic() - tic
        separate = own_namespaces([h.record.pid for h in handles])
        per_combiner: dict[str, int] = {}
        for item in api.get_clients(n_max=1000).get("result", []):
            if item.get("client_id") in {h.client_id for h in handles}:
                key = str(item.get("combiner"))
                per_combiner[key] = per_combiner.get(key, 0) + 1
        tic = time.monotonic()
        session_id = fedn_compat.start_session(
            api, rounds, model_id=seed_id, name=f"scale-{n_clients}",
            # fedn's clients_required is per combiner: the smallest share of one.
            round_timeout=round_timeout, min_clients=max(1, n_clients // n_combiners),
            client_ids=[h.client_id for h in handles])
        session_mod.wait_session(api, session_id, rounds * (round_timeout + 30.0),
                                 poll_s=0.2)
        session_s = time.monotonic() - tic
        log = collect.collect_session(api, session_id, seed_id, names)
        by_round_id = slowest_combiner_s(api.get_rounds(n_max=1000), session_id)
        combiner_s = {info.index: by_round_id.get(info.round_id, math.nan)
                      for info in log.rounds}
        checks = check_rounds(log.records, names, rounds, combiner_s)
    finally:
        peak = sampler.stop()
        for handle in handles:
            ports.stop(handle.record)
        network_down(root)
    return ScaleResult(clients=n_clients, combiners=n_combiners, rounds=checks,
                       session_s=session_s, connect_s=connect_s, up_s=up_s,
                       memory_mb=memory_summary(peak), per_combiner=per_combiner,
                       complete=complete(checks, n_clients), separate_namespaces=separate)


def print_scale(results: list[ScaleResult], train_s: float) -> None:
    """Markdown table of the clinic scaling runs."""
    print(f"\n(a) clinics in namespaces, toy app (train sleeps {train_s:g} s); means over "
          "the rounds; overheads = time - slowest client compute; memory = peak RSS MB\n")
    print("| clinics | combiners (clients each) | all updates every round | round s "
          "(1 s res.) | overhead s | combiner overhead s | session overhead s/round "
          "| API MB | combiner MB (max) | client MB (max) | connect s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for res in results:
        row = res.row()
        spread = "/".join(str(v) for _, v in sorted(res.per_combiner.items()))
        print(f"| {res.clients} | {res.combiners} ({spread}) | "
              f"{'yes' if res.complete else 'NO'} | {row['wall_s']:.2f} | "
              f"{row['overhead_s']:.2f} | {row['combiner_overhead_s']:.2f} | "
              f"{row['session_overhead_s']:.2f} | {row['api_mb']:.0f} | "
              f"{row['combiner_max_mb']:.0f} | {row['client_max_mb']:.0f} | "
              f"{row['connect_s']:.1f} |")
    for res in results:
        for check in res.rounds:
            if check.missing:
                print(f"N={res.clients} round {check.round}: missing {', '.join(check.missing)}")


# --- (b) model size -----------------------------------------------------------------------

MODELS = {"demo-85k": {"levels": 3, "base_filters": 8, "groups": 8},
          "unet-29m": {"levels": 5, "base_filters": 36, "groups": 4}}


def model_experiment(name: str, model: dict[str, Any]) -> dict[str, Any]:
    """2 phantom clinics, 1 round, 1 local step on 16^3 patches, no DP (cheap on a CPU).

    The network's ports are picked free (other people's networks may run here).
    """
    from fedseg.orchestration.network.ports import free_ports

    api_port, s3_port, comb_port = free_ports(3)
    return {
        "name": name, "seed": 5,
        "data": {"phantoms": {"preset": "non-iid", "clinics": 2,
                              "options": {"patients": 3, "size": 32}}},
        "model": model,
        "clinic": {
            "training": {"learning_rate": 0.001, "local_steps": 1, "batch_size": 1,
                         "patch_size": [16, 16, 16]},
            "privacy": {"enabled": False},
            "validation": {"patch_size": [16, 16, 16], "overlap": 0.0, "batch_size": 4},
        },
        "session": {"rounds": 1, "round_timeout": 600, "min_clients": 2},
        "clients": {"env": {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
                            "TF_CPP_MIN_LOG_LEVEL": "2"}},
        "network": {"api_port": api_port, "s3_port": s3_port,
                    "combiners": [{"name": "combiner-1", "port": comb_port}]},
    }


def model_run(name: str, model: dict[str, Any], runs: Path) -> dict[str, Any]:
    """One model-size run through run_experiment; timings, sizes and peak memory."""
    from fedseg.orchestration.experiment import parse_experiment
    from fedseg.orchestration.runlog import pivot, read_rounds
    from fedseg.orchestration.runner import run_experiment

    exp = parse_experiment(model_experiment(name, model), source=f"bench model {name}")
    sampler = MemorySampler().start()
    tic = time.monotonic()
    try:
        result = run_experiment(exp, runs)
    finally:
        peak = sampler.stop()
    total = time.monotonic() - tic
    if result.status != "finished" or result.failures:
        raise RuntimeError(f"model run {name}: {result.status} {result.failures}")
    table = pivot(read_rounds(result.run_dir))
    info = json.loads((result.run_dir / "run.json").read_text())
    seed = result.run_dir / "seed.npz"
    return {"name": name, "model": model, "run_s": total,
            "seed_bytes": seed.stat().st_size if seed.exists() else math.nan,
            "round_s": table.get((1, GLOBAL), {}).get("round_seconds", math.nan),
            "combiner_s": table.get((1, GLOBAL), {}).get("round_exec_training_seconds",
                                                         math.nan),
            "combination_s": table.get((1, GLOBAL), {}).get("round_combination_seconds",
                                                            math.nan),
            "compute_s": max(table.get((1, c), {}).get("client_processing_seconds", 0.0)
                             for c in ("clinic-1", "clinic-2")),
            "train_s": max(table.get((1, c), {}).get("train_seconds", 0.0)
                           for c in ("clinic-1", "clinic-2")),
            "timings": info.get("timings", {}), **memory_summary(peak)}


def print_models(rows: list[dict[str, Any]]) -> None:
    """Markdown table of the model-size runs."""
    print("\n(b) model size: 2 clinics, 1 round, 1 local step, 16^3 patches, callback "
          "route on loopback; memory = peak RSS MB\n")
    print("| model | seed MB | round s (1 s res.) | combiner s | aggregation s | slowest "
          "client compute s (train s) | API MB | combiner MB | client MB (max) | moto MB "
          "| run s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['seed_bytes'] / 1e6:.1f} | {r['round_s']:.0f} | "
              f"{r['combiner_s']:.2f} | {r['combination_s']:.2f} | {r['compute_s']:.2f} "
              f"({r['train_s']:.2f}) | {r['api_mb']:.0f} | "
              f"{r['combiner_max_mb']:.0f} | {r['client_max_mb']:.0f} | {r['s3_mb']:.0f} "
              f"| {r['run_s']:.0f} |")


# --- main ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Run the scenarios and print the tables (and a JSON file with every number)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 5, 10, 20])
    parser.add_argument("--combiners", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-s", type=float, default=3.0)
    parser.add_argument("--models", action="store_true", help="also run (b) model size")
    parser.add_argument("--model", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--skip-clinics", action="store_true")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the work folders under this folder")
    parser.add_argument("--json", type=Path, default=None, help="write every number here")
    args = parser.parse_args(argv)
    import fedn.common.log_config  # noqa: F401  (sets fedn's logger; quieten it after)

    logging.getLogger("fedn").setLevel(logging.WARNING)
    from fedseg.orchestration.netns import namespaces, namespaces_unavailable
    from fedseg_clinic.errors import FedsegError

    root = Path(tempfile.mkdtemp(prefix="bench-scale-")) if args.keep is None \
        else args.keep.resolve()
    root.mkdir(parents=True, exist_ok=True)
    print(f"load average at start {os.getloadavg()[0]:.2f} (1 min); work in {root}")
    out: dict[str, Any] = {"load_start": os.getloadavg()[0], "clinics": [], "models": []}
    try:
        if not args.skip_clinics:
            why = namespaces_unavailable()
            if why is not None:
                print(f"cannot run (a): {why}", file=sys.stderr)
                return 2
            results = []
            try:
                with namespaces(max(args.clients)) as ns:
                    print(f"{len(ns.names)} namespaces; server address {ns.host_ip}")
                    for n in args.clients:
                        load = os.getloadavg()[0]
                        res = scale_run(ns, n, args.combiners, args.rounds, args.train_s,
                                        root / f"clinics-{n}")
                        results.append(res)
                        out["clinics"].append({**res.row(), "load_before": load,
                                               "load_after": os.getloadavg()[0]})
                        print(f"N={n}: {json.dumps(out['clinics'][-1])}", flush=True)
            except FedsegError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            print_scale(results, args.train_s)
        if args.models:
            rows = []
            for name in args.model:
                load = os.getloadavg()[0]
                rows.append({**model_run(name, MODELS[name], root / "models"),
                             "load_before": load, "load_after": os.getloadavg()[0]})
                print(f"{name}: {json.dumps(rows[-1])}", flush=True)
            out["models"] = rows
            print_models(rows)
        out["load_end"] = os.getloadavg()[0]
        print(f"\nload average at end {out['load_end']:.2f} (1 min)")
        if args.json is not None:
            args.json.write_text(json.dumps(out, indent=2, default=str))
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
