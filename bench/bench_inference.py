"""Benchmark: sliding-window inference of a 128^3 volume with the demo U-Net.

Goal: under 10 s per 128^3 volume on a 2-core CPU with the demo model (levels 4, base
filters 16). Prints a markdown table: one row per (patch, overlap, blend, batch), with
the number of windows, the first call (includes tracing), the median wall and process CPU
time of the warm calls, and the peak resident memory of the process so far. On a shared
machine the wall time depends on the load; CPU time / threads estimates the idle wall.

Usage: .venv/bin/python bench/bench_inference.py [--threads 2] [--repeats 3] [--quick]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import numpy as np

from fedseg_clinic.model.inference import sliding_window_predict, window_starts
from fedseg_clinic.model.unet import UNetConfig, build_unet, check_patch_size
from fedseg_clinic.tf_env import keras, tf

VOLUME = (128, 128, 128)
# (patch side, overlap, blend, batch size)
CASES = [
    (64, 0.5, "gaussian", 1),
    (64, 0.5, "gaussian", 2),
    (64, 0.5, "constant", 2),
    (64, 0.25, "gaussian", 2),
    (96, 0.5, "gaussian", 1),
    (96, 0.25, "gaussian", 2),
    (128, 0.5, "gaussian", 1),
]
QUICK = [(64, 0.5, "gaussian", 1), (128, 0.5, "gaussian", 1)]


def peak_rss_gb() -> float:
    """Peak resident memory of this process in GB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def time_case(model: keras.Model, image: np.ndarray, side: int, overlap: float, blend: str,
              batch: int, repeats: int) -> tuple[int, float, float, float]:
    """Return (windows, first-call s, median warm wall s, median warm process CPU s)."""
    patch = check_patch_size(UNetConfig(), (side, side, side))
    windows = int(np.prod([len(window_starts(d, side, overlap)) for d in image.shape]))
    start = time.perf_counter()
    probs = sliding_window_predict(model, image, patch, overlap, blend, batch)
    first = time.perf_counter() - start
    assert np.allclose(probs.sum(-1), 1.0, atol=1e-4)
    warm, cpu = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        sliding_window_predict(model, image, patch, overlap, blend, batch)
        warm.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    return windows, first, statistics.median(warm), statistics.median(cpu)


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="TF intra-op threads")
    parser.add_argument("--repeats", type=int, default=3, help="warm calls per row")
    parser.add_argument("--quick", action="store_true", help="two rows only")
    args = parser.parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)

    model = build_unet(UNetConfig(), seed=0)
    image = np.random.default_rng(0).uniform(-1, 1, VOLUME).astype(np.float32)
    devices = ", ".join(d.device_type for d in tf.config.list_logical_devices())
    print(f"volume {VOLUME}, model levels 4 base 16 ({model.count_params():,} params), "
          f"intra-op threads {args.threads}, devices {devices}")
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    print("| patch | overlap | blend | batch | windows | first call s | warm wall s "
          "| warm CPU s | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for side, overlap, blend, batch in QUICK if args.quick else CASES:
        windows, first, warm, cpu = time_case(model, image, side, overlap, blend, batch,
                                              args.repeats)
        print(f"| {side}^3 | {overlap} | {blend} | {batch} | {windows} | {first:.2f} | "
              f"{warm:.2f} | {cpu:.2f} | {peak_rss_gb():.2f} |", flush=True)


if __name__ == "__main__":
    main()
