"""Validate a weights file (a seed or a run's round model) on clinics' validation sets.

The "seed alone (0 rounds)" baseline of the DP recipe study: the clinics' own
ClinicApp.validate on each clinic's validation cases, as in a federated round, printed as
one JSON line (Dice per clinic, per organ and the mean over clinics):

    python experiments/scripts/eval_weights.py seed/pretrained/demo-seed.npz \
        runs/dp-study-curve/data --overlap 0.0
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path


def main() -> None:
    """Parse arguments, validate, print one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("weights", type=Path, help="weights npz")
    parser.add_argument("data", type=Path, help="folder of clinic-* data folders")
    parser.add_argument("--overlap", type=float, default=0.0)
    parser.add_argument("--patch", type=int, default=24)
    args = parser.parse_args()

    from fedseg_clinic.app import ClinicApp
    from fedseg_clinic.model.weights import load_weights_npz
    from fedseg_clinic.settings import settings_from_mapping

    work = Path(tempfile.mkdtemp(prefix="fedseg-eval-"))
    weights = load_weights_npz(args.weights)
    out: dict[str, object] = {"weights": str(args.weights), "overlap": args.overlap}
    clinics = {}
    for folder in sorted(p for p in args.data.iterdir() if (p / "manifest.json").is_file()):
        settings = settings_from_mapping({
            "model": {"levels": 3, "base_filters": 8, "groups": 4},
            "validation": {"patch_size": [args.patch] * 3, "overlap": args.overlap,
                           "batch_size": 8},
            "data_dir": str(folder), "state_dir": str(work / folder.name),
            "client_name": folder.name}, "eval")
        metrics = ClinicApp(settings).validate(weights)
        clinics[folder.name] = {k[9:] if k.startswith("val_dice_") else k: round(float(v), 4)
                                for k, v in metrics.items()
                                if (k.startswith("val_dice_") or k == "n_val")
                                and not math.isnan(float(v))}
    out["clinics"] = clinics
    means = [c["mean"] for c in clinics.values()]
    out["dice_mean_over_clinics"] = round(sum(means) / len(means), 4)
    organs = sorted({o for c in clinics.values() for o in c if o not in ("mean", "n_val")})
    out["organs_mean_over_clinics"] = {
        o: round(sum(c[o] for c in clinics.values() if o in c)
                 / sum(1 for c in clinics.values() if o in c), 4) for o in organs}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
