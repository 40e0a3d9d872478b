"""bench/bench_scale.py: its round checks and memory roles (fast), and one small real run
of namespaced clinics over two combiners (slow; skipped where namespaces cannot be made)."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
from test_network import net

from fedseg.orchestration.netns import Netns, namespaces, namespaces_unavailable
from fedseg.orchestration.runlog import RoundRecord
from fedseg_clinic.errors import FedsegError

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_scale.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_scale", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _rows(clients: list[str], rounds: int, drop: tuple[int, str] | None = None,
          failed: tuple[int, str] | None = None) -> list[RoundRecord]:
    rows = []
    for k in range(1, rounds + 1):
        aggregated = len(clients) - (drop is not None and drop[0] == k)
        rows += [RoundRecord(k, "global", "round_seconds", 4.0),
                 RoundRecord(k, "global", "round_exec_training_seconds", 6.5),
                 RoundRecord(k, "global", "updates_aggregated", float(aggregated))]
        for i, client in enumerate(clients):
            if drop == (k, client):
                rows.append(RoundRecord(k, client, "train_failed", 1.0))
                continue
            rows += [RoundRecord(k, client, "num_examples", 40.0),
                     RoundRecord(k, client, "client_processing_seconds", 3.0 + 0.1 * i),
                     RoundRecord(k, client, "train_failed",
                                 1.0 if failed == (k, client) else 0.0)]
    return rows


def test_check_rounds_finds_every_missing_update() -> None:
    bench = _bench()
    names = ["clinic-01", "clinic-02", "clinic-03"]
    checks = bench.check_rounds(_rows(names, 2), names, 2, combiner_s={1: 3.5, 2: 3.4})
    assert bench.complete(checks, 3)
    assert [c.missing for c in checks] == [(), ()]
    assert checks[0].slowest_compute_s == pytest.approx(3.2)
    assert checks[0].overhead_s == pytest.approx(0.8)
    assert checks[0].combiner_overhead_s == pytest.approx(0.3)  # the slowest combiner's
    # Without per-combiner times the log's (summed) time is used.
    assert bench.check_rounds(_rows(names, 1), names, 1)[0].combiner_s == 6.5
    dropped = bench.check_rounds(_rows(names, 2, drop=(2, "clinic-02")), names, 2)
    assert dropped[1].missing == ("clinic-02",) and not bench.complete(dropped, 3)
    failed = bench.check_rounds(_rows(names, 2, failed=(1, "clinic-03")), names, 2)
    assert failed[0].missing == ("clinic-03",)
    # A round the session never reached counts as missing everyone.
    short = bench.check_rounds(_rows(names, 1), names, 2)
    assert short[1].missing == tuple(names) and math.isnan(short[1].wall_s)
    assert not bench.complete([], 3)


def test_slowest_combiner_per_round_of_this_session_only() -> None:
    bench = _bench()
    answer = {"result": [
        {"round_id": "7", "round_config": {"session_id": "s1"},
         "combiners": [{"time_exec_training": 3.2}, {"time_exec_training": 3.9}]},
        {"round_id": "8", "round_config": '{"session_id": "s1"}',
         "combiners": [{"time_exec_training": 3.1}]},
        {"round_id": "9", "round_config": {"session_id": "other"},
         "combiners": [{"time_exec_training": 99.0}]},
    ]}
    assert bench.slowest_combiner_s(answer, "s1") == {"7": 3.9, "8": 3.1}


def test_roles_and_memory_summary() -> None:
    bench = _bench()
    launch = [sys.executable, "-m", "fedseg.orchestration.fedn.launch"]
    assert bench.role_of([*launch, "api", "--workers", "2"]) == "api"
    assert bench.role_of([*launch, "combiner", "--name", "combiner-2", "--port", "1"]) == \
        "combiner:combiner-2"
    assert bench.role_of([sys.executable, "-m", "fedseg_clinic.fedn_callback", "--api-url",
                          "u", "--name", "clinic-07"]) == "client:clinic-07"
    assert bench.role_of(["ip", "netns", "exec", "ns", sys.executable, "-m",
                          "fedseg_clinic.fedn_callback", "--name", "c"]) == "client:c"
    assert bench.role_of([sys.executable, "-m", "moto.server"]) == "s3"
    assert bench.role_of(["sleep", "1"]) is None
    mb = 1024 * 1024
    summary = bench.memory_summary({"api": 300 * mb, "combiner:a": 100 * mb,
                                    "combiner:b": 140 * mb, "client:x": 70 * mb})
    assert summary["api_mb"] == 300 and summary["combiner_max_mb"] == 140
    assert summary["combiner_mean_mb"] == 120 and summary["client_max_mb"] == 70
    assert math.isnan(summary["s3_mb"])


def test_memory_sampler_sums_a_role_over_its_processes() -> None:
    bench = _bench()
    code = "import time; x = b\"x\" * (40 * 1024 * 1024); time.sleep(30)"
    procs = [subprocess.Popen([sys.executable, "-c", code, "fedseg_clinic.fedn_callback",
                               "--name", f"c{i}"]) for i in range(2)]
    try:
        sampler = bench.MemorySampler(interval_s=0.1)
        for _ in range(100):  # until both have allocated (a loaded machine: seconds)
            now = sampler.sample()
            if min(now.get("client:c0", 0), now.get("client:c1", 0)) > 40 * 1024 * 1024:
                break
            time.sleep(0.1)
        peak = sampler.stop()
        assert peak["client:c0"] > 40 * 1024 * 1024 and peak["client:c1"] > 40 * 1024 * 1024
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_netns_refuses_a_bad_count() -> None:
    with pytest.raises(FedsegError, match="n=0"):
        Netns(0)
    ns = Netns(20)  # 20 pairs: distinct /30s that fit the 10.213.0.0/16 block
    assert len(set(ns.subnets)) == 20
    assert all(0 <= int(s.split(".")[2]) <= 255 for s in ns.subnets)


@net
def test_scale_run_two_combiners_four_namespaced_clinics(tmp_path: Path) -> None:
    """The real thing, small: 4 clinics, each in its own namespace, over 2 combiners over
    TLS; 2 rounds; every update arrives every round, memory is measured, and nothing is
    left afterwards."""
    why = namespaces_unavailable()
    if why is not None:
        pytest.skip(why)
    bench = _bench()
    with namespaces(4) as ns:
        result = bench.scale_run(ns, 4, 2, rounds=2, train_s=1.0, work=tmp_path)
        names = list(ns.names)
    assert result.complete, result.rounds
    assert result.separate_namespaces
    assert result.per_combiner == {"combiner-1": 2, "combiner-2": 2}
    row = result.row()
    assert row["compute_s"] >= 1.0 and row["combiner_overhead_s"] > 0
    assert row["api_mb"] > 50 and row["combiner_max_mb"] > 50 and row["client_max_mb"] > 30
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not any(name in listed for name in names)
    log = (tmp_path / "clients" / "clinic-01" / "client.log").read_text()
    assert f"https://{ns.host_ip}:" in log
