"""Benchmark: how long `fedseg audit` takes at the demo's model and privacy settings.

Times the library path of ``fedseg audit`` (run_canary_audit, then run_membership, per
noise multiplier) with the demo experiment's U-Net (levels 3, base 8, groups 4), 32^3
patches, Adam lr 0.01, clip 1 and sigma 0.8 (orchestration/runner.py demo_experiment),
prints a table (phase, seconds) and extrapolates the measured per-step cost to the full
audit's step count.

Sizing (the full audit, the defaults of --full-steps and --canaries):
- steps T = 150: a demo clinic's DP-SGD steps in a whole demo (5 rounds x 30 local steps),
  so the accountant's epsilon is the one a demo clinic reports.
- canaries m = 64 (32 expected in the training set) beside 4 ordinary patients, and the
  expected batch B chosen so that the sampling rate q = B / N equals a demo clinic's
  (B = 2 of about 8 training patients, q = 0.25): B = round(q * (4 + m / 2)) = 9. Same
  q, sigma and T, so the same accountant epsilon. A one-run audit can only show an epsilon
  up to a ceiling set by m (all guesses right); m = 64 lifts it from 1.2 (m = 32) to about
  2.0, and each doubling of m doubles B and so the cost per step.
- membership: 16 candidate patients (8 members, so B = 2 is again q = 0.25), 3 shadow
  models (`fedseg audit`'s default), the same T.

The same audit from the command line (writes audit.json, audit.png, report.html):
    fedseg audit --out DIR --noise none,0.8 --canaries 64 --patients 4 --batch 9
        --steps 150 --lr 0.01 --levels 3 --base-filters 8 --groups 4 --patch 32
        --optimizer adam --membership-batch 2 --shadow 3

Usage: .venv/bin/python bench/bench_audit.py [--steps 10] [--full-steps 150]
           [--canaries 64] [--noise none,0.8] [--shadow 3] [--threads 0]
The measured run uses --steps (a reduced run); the extrapolation scales the time of all
steps after the first (tracing) one to --full-steps, everything else stays as measured.
"""

from __future__ import annotations

import argparse
import os
import time

DEMO_Q: float = 0.25  # a demo clinic: B = 2 of about 8 training patients
ORDINARY_PATIENTS: int = 4
MEMBERSHIP_TARGETS: int = 16


def _noises(text: str) -> list[float | None]:
    return [None if v.strip().lower() == "none" else float(v) for v in text.split(",")
            if v.strip()]


def _scaled(steps_seconds: float, steps: int, full_steps: int) -> float:
    """The time of steps 2..full_steps from the time of steps 2..steps."""
    return steps_seconds / max(steps - 1, 1) * (full_steps - 1)


def main() -> None:
    """Run the reduced audit and print the measured and extrapolated tables."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--full-steps", type=int, default=150)
    parser.add_argument("--canaries", type=int, default=64)
    parser.add_argument("--noise", default="none,0.8")
    parser.add_argument("--shadow", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0,
                        help="TF intra-op threads (0 = TensorFlow's default).")
    args = parser.parse_args()

    from fedseg.analysis.leakage.canary import (
        CanaryAuditConfig,
        epsilon_lower_bound,
        run_canary_audit,
    )
    from fedseg.analysis.leakage.membership import MembershipConfig, run_membership
    from fedseg_clinic.tf_env import tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    batch = max(1, round(DEMO_Q * (ORDINARY_PATIENTS + args.canaries / 2)))
    model = {"levels": 3, "base_filters": 8, "groups": 4, "patch": 32,
             "optimizer": "adam"}
    ceiling = epsilon_lower_bound(args.canaries, args.canaries // 2, args.canaries // 2,
                                  1e-5, 1 - 0.05 / 3)
    print(f"demo-size audit: U-Net levels 3, base 8, groups 4, 32^3 patches, Adam lr 0.01, "
          f"clip 1; {args.canaries} canaries + {ORDINARY_PATIENTS} patients, B = {batch}; "
          f"membership {MEMBERSHIP_TARGETS} targets, B = 2, {args.shadow} shadows; "
          f"measured with {args.steps} steps, extrapolated to {args.full_steps}; "
          f"ceiling of the bound (all {args.canaries // 2} guesses right): {ceiling:.2f}; "
          f"load average {os.getloadavg()[0]:.1f}")
    measured: list[tuple[str, float, float]] = []
    started = time.perf_counter()
    for noise in _noises(args.noise):
        tag = "none" if noise is None else f"{noise:g}"
        canary = run_canary_audit(CanaryAuditConfig(
            n_canaries=args.canaries, n_patients=ORDINARY_PATIENTS, noise_multiplier=noise,
            l2_norm_clip=1.0, batch_size=batch, steps=args.steps, learning_rate=0.01,
            delta=1e-5, seed=0, **model))
        t = canary["timings"]
        steps_s = t.get("steps", 0.0)
        for phase in ("records", "model", "first_step"):
            measured.append((f"sigma {tag}: canary {phase}", t[phase], t[phase]))
        measured.append((f"sigma {tag}: canary steps 2..T", steps_s,
                         _scaled(steps_s, args.steps, args.full_steps)))
        measured.append((f"sigma {tag}: canary score + bound", t["score_and_bound"],
                         t["score_and_bound"]))
        member = run_membership(MembershipConfig(
            n_targets=MEMBERSHIP_TARGETS, n_shadow=args.shadow, noise_multiplier=noise,
            steps=args.steps, batch_size=2, learning_rate=0.01, l2_norm_clip=1.0,
            delta=1e-5, seed=0, **model))
        m = member["timings"]
        m_steps = m.get("steps", 0.0)
        other = m["target"] + m["shadows"] - m["first_steps"] - m_steps
        measured.append((f"sigma {tag}: membership phantoms + scoring", other, other))
        measured.append((f"sigma {tag}: membership first steps ({args.shadow + 1} models)",
                         m["first_steps"], m["first_steps"]))
        measured.append((f"sigma {tag}: membership steps 2..T ({args.shadow + 1} models)",
                         m_steps, _scaled(m_steps, args.steps, args.full_steps)))
        print(f"sigma {tag}: accountant epsilon at {args.steps} steps "
              f"{canary['epsilon']:.3g}, lower bound {canary['epsilon_lower_bound']:.3f} "
              f"({canary['v']}/{canary['r']}), canary AUC {canary['attack_auc']:.3f}; "
              f"per step: canary {steps_s / max(args.steps - 1, 1):.2f} s (B = {batch}), "
              f"membership {m_steps / max(args.steps - 1, 1) / (args.shadow + 1):.2f} s "
              "(B = 2)")
    wall = time.perf_counter() - started
    print(f"| phase | seconds ({args.steps} steps, measured) | seconds ({args.full_steps} "
          "steps, extrapolated) |")
    print("|---|---|---|")
    for name, seconds, full in measured:
        print(f"| {name} | {seconds:.1f} | {full:.1f} |")
    total = sum(m[1] for m in measured)
    full_total = sum(m[2] for m in measured)
    print(f"| **total** | {total:.1f} (wall {wall:.1f}) | {full_total:.1f} "
          f"({full_total / 60:.1f} min) |")


if __name__ == "__main__":
    main()
