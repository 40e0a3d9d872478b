"""bench/bench_soak.py's verdict: warm-up that levels off is flat, steady growth is not."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_soak.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_soak", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_soak"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _series(bench: ModuleType, role: str, rss: list[float], fds: list[int]) -> object:
    rounds = [1, *range(10, 10 * len(rss), 10)][:len(rss)]
    return bench.Series(role, rounds=rounds, rss_mb=rss, fds=fds)


def test_verdict_judges_the_second_half_only() -> None:
    bench = _bench()
    n = 26  # rounds 1, 10, ..., 250
    warm = [380 + min(k, 9) * 7.0 for k in range(n)]  # +63 MB over 90 rounds, then level
    steady = [640 + 1.8 * k for k in range(n)]  # +0.18 MB a round, all along
    leaky_fds = [6] * 13 + [6 + k for k in range(13)]
    series = {"api": _series(bench, "api", warm, [23] * n),
              "runner": _series(bench, "runner", steady, [6] * n),
              "client": _series(bench, "client", [75.0] * n, leaky_fds)}
    growing = bench.verdict(series, 250, rss_tolerance_mb=10.0)
    assert len(growing) == 2
    assert growing[0].startswith("runner RSS +1.80 MB/10 rounds")
    assert growing[1].startswith("client fds 6 -> 18")
    # A warm-up that has not levelled by half time is still growth.
    late = {"api": _series(bench, "api", [380 + min(k, 20) * 3.0 for k in range(n)], [23] * n)}
    assert bench.verdict(late, 250, rss_tolerance_mb=10.0)
