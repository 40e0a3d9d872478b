"""In-process FedAvg simulation of the DP fine-tuning recipe (no FEDn), for quick studies.

Runs the clinics' own ClinicApp train/validate on phantom clinics and FedAvg-averages the
returned weights by num_examples, exactly what FEDn's FedAvg does with them. Prints one
JSON line per round and a final summary. The FEDn run of the same recipe is `fedseg demo`.

    python experiments/scripts/simulate_dp_recipe.py --seed-weights seed/pretrained/demo-seed.npz \
        --trainable norm_bias --target-epsilon 8 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    """Parse arguments, run the simulation, print JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed-weights", type=Path, default=None,
                        help="pretrained seed npz (default: random init)")
    parser.add_argument("--trainable", default="all")
    parser.add_argument("--target-epsilon", type=float, default=None,
                        help="per-clinic epsilon; omit for no DP")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--patch", type=int, default=24)
    parser.add_argument("--k", type=int, default=1, help="patches per patient")
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--skew", type=float, default=3.0)
    parser.add_argument("--data-seed", type=int, default=7)
    parser.add_argument("--clinic-seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()

    from fedseg.orchestration.phantoms import generate_benchmark, preset_spec
    from fedseg_clinic.app import ClinicApp
    from fedseg_clinic.model.weights import load_weights_npz
    from fedseg_clinic.settings import settings_from_mapping

    work = Path(tempfile.mkdtemp(prefix="fedseg-sim-"))
    data = args.data_dir or work / "data"
    if not (data / "clinic-1" / "manifest.json").exists():
        spec = preset_spec("non-iid", 3, args.patients, 48, args.data_seed, args.skew)
        generate_benchmark(spec, data, overwrite=True)
    model = {"levels": 3, "base_filters": 8, "groups": 4}
    privacy: dict[str, object] = {"enabled": False}
    if args.target_epsilon is not None:
        privacy = {"enabled": True, "target_epsilon": args.target_epsilon,
                   "planned_rounds": args.rounds, "l2_norm_clip": 1.0,
                   "secure_randomness": False}
    apps = []
    for i, name in enumerate(("clinic-1", "clinic-2", "clinic-3")):
        settings = settings_from_mapping({
            "model": model,
            "training": {"optimizer": "adam", "learning_rate": args.lr,
                         "local_steps": args.local_steps, "batch_size": args.batch,
                         "patch_size": [args.patch] * 3, "trainable": args.trainable,
                         "augmentations_per_patient": args.k,
                         "seed": args.clinic_seed * 10 + i},
            "privacy": privacy,
            "validation": {"patch_size": [args.patch] * 3, "overlap": 0.25, "batch_size": 4},
            "data_dir": str(data / name), "state_dir": str(work / "state" / name),
            "client_name": name}, "simulation")
        apps.append(ClinicApp(settings))
    weights = (load_weights_npz(args.seed_weights) if args.seed_weights
               else [w.copy() for w in apps[0].model.get_weights()])

    def validate(round_index: int, eps: list[float]) -> dict[str, object]:
        vals = [app.validate(weights) for app in apps]
        dice = [v["val_dice_mean"] for v in vals]
        n_val = [v["n_val"] for v in vals]
        organs = sorted(k for k in vals[0] if k.startswith("val_dice_") and k != "val_dice_mean")
        per_organ = {}
        for key in organs:
            pairs = [(v[key], n) for v, n in zip(vals, n_val, strict=True)
                     if not math.isnan(v.get(key, math.nan))]
            per_organ[key[9:]] = round(sum(a * n for a, n in pairs) / sum(n for _, n in pairs), 4)
        return {"round": round_index, "dice_clinics": [round(d, 4) for d in dice],
                "dice_mean": round(float(np.average(dice, weights=n_val)), 4),
                "dice_organs": per_organ, "epsilon": [round(e, 3) for e in eps]}

    started = time.time()
    print(json.dumps(validate(0, [0.0, 0.0, 0.0])), flush=True)
    for r in range(1, args.rounds + 1):
        results = [app.train(weights, {}) for app in apps]
        total = sum(meta["num_examples"] for _, meta in results)
        weights = [sum(w[j] * (meta["num_examples"] / total) for w, meta in results)
                   for j in range(len(weights))]
        row = validate(r, [meta["epsilon"] for _, meta in results])
        row["sigma"] = [round(meta["noise_multiplier"], 3) for _, meta in results]
        row["trained_parameters"] = results[0][1]["trained_parameters"]
        row["n_train"] = [meta["num_examples"] for _, meta in results]
        row["seconds"] = round(time.time() - started, 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
