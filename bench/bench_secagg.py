"""Benchmark: what secure aggregation costs, per clinic and per round.

Usage: .venv/bin/python bench/bench_secagg.py [--clinics 3 10 20] [--demo-rounds 3]
       [--skip-demo]

(a) Protocol cost for the demo model (``demo_experiment``'s U-Net) with 3, 10 and 20
    clinics, in one process, no FEDn: a clinic's masking time (quantise + one AES-CTR
    mask per peer + next round's key and encrypted Shamir shares), the server's unmasking
    time (ring sum of all masked updates + dequantise), and the bytes per clinic and
    round: the update as FEDn ships it (numpyhelper npz) plain vs masked, plus the
    protocol's JSON in the round's settings (received) and metadata (sent).
(b) The demo experiment through real FEDn with 3 clinics, plain and secure, rounds
    compared as FEDn timed them (``round_seconds``, whole seconds, and the combiner's
    ``round_exec_training_seconds``). A secure session spends its first round on keys,
    so it runs one round more; the first training round of each (TensorFlow tracing) is
    left out of the comparison. Goal: secure <= 1.2 x plain.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GOAL = 1.2


def demo_weights() -> list[np.ndarray]:
    """The demo model's seed weights, built by the project's own seed builder."""
    from fedn.utils.helpers.helpers import get_helper

    from fedseg.orchestration.runner import demo_experiment, resolve_callable

    exp = demo_experiment(rounds=1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "seed.npz"
        resolve_callable(exp.seed_builder, "seed_builder")(dict(exp.model), out, seed=0)
        return get_helper("numpyhelper").load(str(out))


def npz_bytes(weights: list[np.ndarray]) -> int:
    """Size of the update as FEDn's numpyhelper serialises it."""
    from fedn.utils.helpers.helpers import get_helper

    buf = io.BytesIO()
    get_helper("numpyhelper").save(weights, buf)
    return len(buf.getvalue())


def protocol_cost(n: int, weights: list[np.ndarray]) -> dict[str, float]:
    """One keys round and one training round of ``n`` in-process clinics."""
    from fedseg.orchestration.secure_aggregation import SecAggServer
    from fedseg_clinic.privacy.secagg_clinic import SecAggClinic

    rng = np.random.default_rng(0)
    ids = [f"clinic-{i:02d}" for i in range(n)]
    server = SecAggServer("bench", [{}])
    clinics = {c: SecAggClinic(c) for c in ids}
    trained = {c: [w + 1e-3 * rng.standard_normal(w.shape).astype(w.dtype) for w in weights]
               for c in ids}
    settings = server.client_settings()
    server.aggregate(weights, {c: [weights, clinics[c].handle(settings["secagg"], weights,
                                                              lambda: ([], {}))[1]]
                               for c in ids})
    settings = server.client_settings()  # round 2: everybody keyed
    updates, mask_s, sent_meta = {}, [], []
    for c in ids:
        tic = time.perf_counter()
        out, meta = clinics[c].handle(settings["secagg"], weights,
                                      lambda c=c: (trained[c], {"num_examples": 10}))
        mask_s.append(time.perf_counter() - tic)
        updates[c] = [out, meta]
        sent_meta.append(len(meta["secagg"]))
    tic = time.perf_counter()
    result = server.aggregate(weights, updates)
    unmask_s = time.perf_counter() - tic
    plain_mean = [np.mean([trained[c][i] for c in ids], axis=0) for i in range(len(weights))]
    err = max(float(np.max(np.abs(r - p))) for r, p in zip(result, plain_mean, strict=True))
    return {"clinics": n, "mask_s": statistics.median(mask_s), "unmask_s": unmask_s,
            "plain_bytes": npz_bytes(trained[ids[0]]),
            "masked_bytes": npz_bytes(updates[ids[0]][0]),
            "settings_bytes": len(settings["secagg"]), "metadata_bytes": max(sent_meta),
            "max_abs_error": err}


def demo_rounds(rounds: int, out: Path) -> dict[str, dict[str, float]]:
    """Median round times of the demo run plain and secure (training rounds 2.. only)."""
    from fedseg.orchestration.runlog import GLOBAL, pivot, read_rounds
    from fedseg.orchestration.runner import demo_experiment, run_experiment

    results = {}
    for mode in ("plain", "secure"):
        secure = mode == "secure"
        exp = demo_experiment(rounds=rounds + (1 if secure else 0))
        exp = dataclasses.replace(exp, name=f"demo-{mode}", session=dataclasses.replace(
            exp.session, secure_aggregation=secure))
        tic = time.monotonic()
        result = run_experiment(exp, out, overwrite=True)
        wall = time.monotonic() - tic
        table = pivot(read_rounds(result.run_dir))
        first_training = 2 if secure else 1
        ks = range(first_training + 1, first_training + rounds)
        results[mode] = {
            "status": result.status, "wall_s": wall,
            "round_s": statistics.median(table[(k, GLOBAL)]["round_seconds"] for k in ks),
            "exec_s": statistics.median(table[(k, GLOBAL)]["round_exec_training_seconds"]
                                        for k in ks),
            "rounds_compared": len(ks),
            "model_bytes": (result.run_dir / "seed.npz").stat().st_size}
    return results


def main(argv: list[str] | None = None) -> int:
    """Print both tables as markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clinics", type=int, nargs="+", default=[3, 10, 20])
    parser.add_argument("--demo-rounds", type=int, default=3)
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    weights = demo_weights()
    n_params = sum(w.size for w in weights)
    print(f"demo model: {len(weights)} tensors, {n_params} parameters")
    print("\n| clinics | mask s / clinic | unmask s (server) | update plain B | update masked B"
          " | settings JSON B | metadata JSON B | max abs error vs plain mean |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.clinics:
        r = protocol_cost(n, weights)
        print(f"| {n} | {r['mask_s']:.3f} | {r['unmask_s']:.3f} | {r['plain_bytes']} | "
              f"{r['masked_bytes']} | {r['settings_bytes']} | {r['metadata_bytes']} | "
              f"{r['max_abs_error']:.1e} |")
        sys.stdout.flush()
    if args.skip_demo:
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        res = demo_rounds(args.demo_rounds, args.out or Path(tmp))
    print("\n| mode | status | median round s (FEDn, whole s) | median exec training s |"
          " rounds compared | run wall s |")
    print("|---|---|---|---|---|---|")
    for mode, r in res.items():
        print(f"| {mode} | {r['status']} | {r['round_s']:.1f} | {r['exec_s']:.2f} | "
              f"{r['rounds_compared']} | {r['wall_s']:.0f} |")
    ratio = res["secure"]["exec_s"] / res["plain"]["exec_s"]
    print(f"\nsecure / plain (exec training): {ratio:.2f} (goal <= {GOAL})")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
