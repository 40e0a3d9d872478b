"""Benchmark: seconds per step and peak memory of plain vs DP training steps on the U-Net.

Wall and CPU (process_time, all threads) seconds per step are both reported: on a shared
machine the CPU seconds are the steadier comparison. Each (method, patch, batch) runs
in a fresh subprocess so its peak RSS
(resource.getrusage ru_maxrss; tracemalloc does not see TensorFlow's allocator) is its
own. Methods:
  plain_adam   non-DP Adam, one batched backward pass (the baseline)
  dp_adam      fedseg_clinic.privacy.dp_sgd.DPTrainer, DP-Adam (per-example loop, TF Privacy
               GaussianSumQuery clipping + noise)
  tfp_dpsgd    TF Privacy's stock DPKerasSGDOptimizer, num_microbatches = batch

Usage: .venv/bin/python bench/bench_dp_step.py [--patches 32 48 64] [--batches 4 2]
           [--methods plain_adam dp_adam tfp_dpsgd] [--steps 4] [--markdown FILE]
The goal from the issue: at 48^3, batch 4, dp_adam <= 1.3x plain_adam in s/step and
in peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("plain_adam", "dp_adam", "tfp_dpsgd")


def run_one(method: str, patch: int, batch: int, steps: int) -> dict:
    """Build the U-Net, take warm-up + timed steps with `method`; runs in the child."""
    import numpy as np

    from fedseg_clinic.model.losses import per_example_loss
    from fedseg_clinic.model.unet import N_CLASSES, UNetConfig, build_unet
    from fedseg_clinic.privacy.dp_sgd import DPConfig, DPTrainer
    from fedseg_clinic.tf_env import keras, tf

    model = build_unet(UNetConfig(levels=4, base_filters=16), seed=0)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(batch, patch, patch, patch, 1)).astype(np.float32)
    labels = rng.integers(0, N_CLASSES, size=(batch, patch, patch, patch)).astype(np.int32)
    known = np.ones((batch, N_CLASSES), np.float32)

    if method == "dp_adam":
        trainer = DPTrainer(model, per_example_loss,
                            DPConfig(1.0, 1.0, batch, 1e-3, "adam"), seed=0)

        def step() -> None:
            trainer.step(images, labels, known)
    elif method == "plain_adam":
        optimizer = keras.optimizers.Adam(1e-3)

        @tf.function
        def plain(x: tf.Tensor, y: tf.Tensor, k: tf.Tensor) -> tf.Tensor:
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(per_example_loss(y, model(x, training=True), k))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
            return loss

        def step() -> None:
            plain(images, labels, known).numpy()
    elif method == "tfp_dpsgd":
        from tensorflow_privacy.privacy.optimizers.dp_optimizer_keras import (
            DPKerasSGDOptimizer,
        )
        optimizer = DPKerasSGDOptimizer(l2_norm_clip=1.0, noise_multiplier=1.0,
                                        num_microbatches=batch, learning_rate=1e-3)

        @tf.function
        def stock(x: tf.Tensor, y: tf.Tensor, k: tf.Tensor) -> None:
            optimizer.minimize(lambda: per_example_loss(y, model(x, training=True), k),
                               model.trainable_variables, tape=tf.GradientTape())

        def step() -> None:
            stock(images, labels, known)
            model.trainable_variables[0].numpy()  # wait for the update
    else:
        raise SystemExit(f"unknown method {method}")

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    step()  # traces
    first = time.perf_counter() - start
    step()
    times, cpu_times = [], []
    for _ in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "method": method, "patch": patch, "batch": batch,
        "s_per_step": statistics.median(times), "first_step_s": first,
        "cpu_s_per_step": statistics.median(cpu_times),
        "rss_before_mb": rss_before / 1024,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def spawn(method: str, patch: int, batch: int, steps: int, timeout: float) -> dict:
    """Run one configuration in a fresh interpreter and parse its JSON line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", method,
               str(patch), str(batch), str(steps)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"method": method, "patch": patch, "batch": batch, "error": "timeout"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"method": method, "patch": patch, "batch": batch, "error": tail[:80]}
    return json.loads(lines[-1])


def table(rows: list[dict]) -> str:
    """Markdown table with DP/plain ratios per (patch, batch)."""
    plain = {(r["patch"], r["batch"]): r for r in rows
             if r["method"] == "plain_adam" and "error" not in r}
    out = ["| patch | batch | method | s/step | x plain | CPU s/step | x plain | peak RSS MB "
           "| x plain | first step s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['patch']}^3 | {r['batch']} | {r['method']} | failed: "
                       f"{r['error']} | | | | | | |")
            continue
        base = plain.get((r["patch"], r["batch"]))
        t_ratio = f"{r['s_per_step'] / base['s_per_step']:.2f}" if base else "-"
        m_ratio = f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}" if base else "-"
        cpu, base_cpu = r.get("cpu_s_per_step"), base and base.get("cpu_s_per_step")
        cpu_text = f"{cpu:.2f}" if cpu else "-"
        c_ratio = f"{cpu / base_cpu:.2f}" if cpu and base_cpu else "-"
        out.append(f"| {r['patch']}^3 | {r['batch']} | {r['method']} | {r['s_per_step']:.2f} "
                   f"| {t_ratio} | {cpu_text} | {c_ratio} | {r['peak_rss_mb']:.0f} | {m_ratio} "
                   f"| {r['first_step_s']:.1f} |")
    return "\n".join(out)


def main() -> None:
    """Parse arguments, run every configuration in its own process, print the table."""
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        method, patch, batch, steps = sys.argv[2], *map(int, sys.argv[3:6])
        print(json.dumps(run_one(method, patch, batch, steps)), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, nargs="+", default=[32, 48, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=4, help="timed steps (median)")
    parser.add_argument("--timeout", type=float, default=900.0, help="per configuration")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args()
    rows = []
    for patch in args.patches:
        for batch in args.batches:
            for method in args.methods:
                row = spawn(method, patch, batch, args.steps, args.timeout)
                print(json.dumps(row), file=sys.stderr, flush=True)
                rows.append(row)
    text = table(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
