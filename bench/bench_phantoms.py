"""Benchmark: phantom benchmark generation time (goal: 3 clinics x 20 patients at 64^3 < 30 s).

Each configuration runs ``generate_benchmark`` in a fresh subprocess (so peak RSS is its
own) into a temporary folder, and reports wall time, time per patient, voxels/s and the
bytes written. Also reports the split of one patient's time into anatomy rendering,
scanner effects and DICOM writing.

Usage: .venv/bin/python bench/bench_phantoms.py [--clinics 3] [--patients 20] [--size 64]
           [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS: dict[str, dict[str, object]] = {
    "iid": {"preset": "iid", "dicom": False},
    "non-iid": {"preset": "non-iid", "dicom": False},
    "iid + DICOM": {"preset": "iid", "dicom": True},
}


def _child(args: argparse.Namespace) -> None:
    from fedseg.orchestration import phantoms as ph

    config = CONFIGS[args.config]
    spec = ph.preset_spec(str(config["preset"]), args.clinics, args.patients, args.size,
                          seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench"
        start = time.perf_counter()
        ph.generate_benchmark(spec, out, dicom=bool(config["dicom"]))
        seconds = time.perf_counter() - start
        written = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    voxels = sum(c.patients * _prod(spec.grid(c)[0]) for c in spec.clinics)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"seconds": seconds, "patients": sum(c.patients for c in spec.clinics),
                      "voxels": voxels, "bytes": written, "peak_mb": peak_mb}))


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def _stages(size: int) -> dict[str, float]:
    """Median seconds of each stage for one reference patient (in this process)."""
    from fedseg.orchestration import phantoms as ph
    from fedseg.orchestration.phantoms.dicom import write_case_dicom

    spec = ph.preset_spec("iid", 1, 1, size, seed=1)
    clinic = spec.clinics[0]
    shape, spacing = spec.grid(clinic)
    times: dict[str, list[float]] = {"anatomy": [], "scanner": [], "dicom": []}
    for rep in range(5):
        start = time.perf_counter()
        anatomy = ph.draw_anatomy(ph.patient_rng(1, 0, 0, ph.STREAM_ANATOMY), clinic.size_scale)
        phantom = ph.render_phantom(anatomy, shape, spacing,
                                    ph.patient_rng(1, 0, 0, ph.STREAM_TEXTURE))
        times["anatomy"].append(time.perf_counter() - start)
        start = time.perf_counter()
        ph.apply_scanner(phantom.hu, clinic, spacing, ph.patient_rng(1, 0, 0, ph.STREAM_SCANNER))
        times["scanner"].append(time.perf_counter() - start)
        case = ph.make_case(spec, 0, 0)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            write_case_dicom(case, Path(tmp) / f"p{rep}", uid_seed="bench")
            times["dicom"].append(time.perf_counter() - start)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clinics", type=int, default=3)
    parser.add_argument("--patients", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.config is not None:
        _child(args)
        return
    print(f"phantoms: {args.clinics} clinics x {args.patients} patients, size {args.size}, "
          f"{args.repeats} runs per config (fresh process each)")
    print("| config | patients | Mvoxels | seconds (runs) | s/patient | MB written | "
          "peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for name in CONFIGS:
        runs = []
        for _ in range(args.repeats):
            proc = subprocess.run(
                [sys.executable, __file__, "--config", name, "--clinics", str(args.clinics),
                 "--patients", str(args.patients), "--size", str(args.size)],
                check=True, capture_output=True, text=True)
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        best = min(r["seconds"] for r in runs)
        first = runs[0]
        seconds = " / ".join(f"{r['seconds']:.1f}" for r in runs)
        print(f"| {name} | {first['patients']} | {first['voxels'] / 1e6:.1f} | {seconds} | "
              f"{best / first['patients']:.3f} | {first['bytes'] / 1e6:.1f} | "
              f"{max(r['peak_mb'] for r in runs):.0f} |")
    stages = _stages(args.size)
    print(f"one patient at {args.size}^3 (median of 5): "
          + ", ".join(f"{k} {v:.3f} s" for k, v in stages.items()))


if __name__ == "__main__":
    main()
