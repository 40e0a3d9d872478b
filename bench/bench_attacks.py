"""Benchmark: the inversion study at its default grid, and the cost of the audits.

Runs ``fedseg.analysis.leakage.inversion.run_study`` (tiny U-Net: levels 2, base 8, 8^3 patches,
one-factor-at-a-time grid: batch 1/2/4/8, local steps 1/5/20 with a new batch per step,
sigma 0, 0.001/0.01/0.1 and the sigma calibrated for epsilon 8/4/1), then one non-private
and two DP canary audits, and prints markdown tables (quality per grid point with the
prior-only baseline, seconds). ``--same-batch``: the client reuses one batch at every step
(the attacker's best case).

Usage: .venv/bin/python bench/bench_attacks.py [--iterations 150] [--skip-audit]
           [--base-filters 8] [--patch 8] [--same-batch]
           [--out DIR]   (DIR receives study.json)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def main() -> None:
    """Run the study (and audits) and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--base-filters", type=int, default=8)
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--skip-audit", action="store_true")
    parser.add_argument("--same-batch", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from fedseg.analysis.leakage import inversion as inv
    from fedseg.analysis.leakage import results as lr
    from fedseg.analysis.leakage.canary import CanaryAuditConfig, run_canary_audit
    from fedseg_clinic.model.unet import UNetConfig

    started = time.perf_counter()
    result = inv.run_study(UNetConfig(levels=2, base_filters=args.base_filters),
                           inv.StudyGrid(), inv.AttackConfig(iterations=args.iterations),
                           patch=args.patch,
                           learning_rate=0.1, l2_norm_clip=1.0, seed=0,
                           fresh_batches=not args.same_batch)
    study_seconds = time.perf_counter() - started
    if args.out is not None:
        lr.write_json(args.out / "study.json", result)
    print(f"model levels 2, base {args.base_filters}, patch {args.patch}^3, "
          f"{args.iterations} attack iterations")
    print(f"sigma for epsilon (N, B, T, delta = {result['schedule']}): "
          f"{result['sigma_for_epsilon']}")
    print(f"batches: {'the same at every step' if args.same_batch else 'new per step'}")
    print("| batch | local steps | sigma (target eps) | PSNR dB (prior) | SSIM (prior) | "
          "correlation (prior) | mask Dice (prior) | recognisable | attack s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        b = r["baseline"]
        eps = "" if r["target_epsilon"] is None else f" ({r['target_epsilon']:g})"
        print(f"| {r['batch_size']} | {r['local_steps']} | {r['noise_multiplier']:.3g}{eps} | "
              f"{r['psnr']:.2f} ({b['psnr']:.2f}) | {r['ssim']:.3f} ({b['ssim']:.3f}) | "
              f"{r['correlation']:.3f} ({b['correlation']:.3f}) | "
              f"{r['mask_dice']:.3f} ({b['mask_dice']:.3f}) | "
              f"{r['recognisable']} | {r['seconds']:.1f} |")
    print(f"smallest unrecognisable sigma: {result['smallest_unrecognisable_sigma']}; "
          f"study total {study_seconds:.0f} s")
    if args.skip_audit:
        return
    print("| audit | accountant eps | empirical lower bound (95 %) | correct/guesses | "
          "canary AUC | s |")
    print("|---|---|---|---|---|---|")
    for noise in (None, 1.0, 2.0):
        a = run_canary_audit(CanaryAuditConfig(noise_multiplier=noise))
        print(f"| sigma {noise} | {a['epsilon']:.3g} | {a['epsilon_lower_bound']:.3f} | "
              f"{a['v']}/{a['r']} | {a['attack_auc']:.3f} | {a['seconds']:.0f} |")


if __name__ == "__main__":
    main()
