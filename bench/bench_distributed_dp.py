"""Benchmark: where the DP noise goes, local vs distributed, at equal epsilon per clinic.

Usage: .venv/bin/python bench/bench_distributed_dp.py [--rounds 10] [--epsilon 8]
       [--lr 0.5] [--honest 1 2] [--out FILE.json]

The demo's clinics (three non-iid phantom clinics, 57 / 41 / 22 patients) start from the
demo's public-pretrained seed and fine-tune its GroupNorm scale/offset and biases with
DP-FedSGD: every round, each clinic's ``ClinicApp.contribute`` (the production code of
``privacy.distributed``: full batch, clipped, truncated integer sums, Skellam share of
variance mu / m) and the server's step (``SecAggServer._apply``: w - lr Z / (s N)),
in one process, without FEDn or masks (masks cancel exactly; the FEDn path is tested in
tests/test_secagg_e2e.py). Every arm has the same noise multiplier z of the aggregate,
calibrated so that ``--rounds`` rounds end at ``--epsilon`` per clinic (the ledgers agree);
only m differs (``--honest``):

- m = 1: every clinic adds all of mu: local DP-GD (no trust in anyone), std of the sum
  z sqrt(3);
- m = 2: the default (the secure-aggregation threshold of 3), z sqrt(3 / 2);

(m = 3, every clinic honest and present, is not reachable: m is capped at the secure-
aggregation threshold, 2 of 3, so that dropouts cannot break the guarantee.)

Reports mean validation Dice (per clinic and organ) of the seed and after the rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    """Run the arms and print one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--honest", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from fedseg.orchestration.phantoms import generate_benchmark, preset_spec
    from fedseg.orchestration.runner import demo_experiment
    from fedseg.orchestration.secure_aggregation import SecAggServer
    from fedseg_clinic.app import ClinicApp
    from fedseg_clinic.model.weights import load_weights_npz
    from fedseg_clinic.settings import settings_from_mapping

    exp = demo_experiment()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    opts = exp.data.phantoms.options  # type: ignore[union-attr]
    generate_benchmark(preset_spec("non-iid", clinics=3, patients=int(opts["patients"]),
                                   size=int(opts["size"]), seed=exp.seed,
                                   quantity_skew=float(opts["quantity_skew"])), tmp / "data")
    seed = load_weights_npz(Path(str(exp.seed_weights)))
    names = ["clinic-1", "clinic-2", "clinic-3"]
    result: dict[str, object] = {"rounds": args.rounds, "epsilon": args.epsilon,
                                 "lr": args.lr, "arms": {}}

    def make_apps(tag: str, honest: int | None) -> list[ClinicApp]:
        apps = []
        for name in names:
            clinic = json.loads(json.dumps(exp.clinic))
            clinic["training"].update(optimizer="sgd", learning_rate=args.lr)
            clinic["privacy"].update(distributed=True, target_epsilon=args.epsilon,
                                     planned_rounds=args.rounds, distributed_honest=honest)
            settings = settings_from_mapping({"model": dict(exp.model), **clinic}, "bench")
            settings.data_dir = tmp / "data" / name
            settings.state_dir = tmp / tag / name / "state"
            settings.privacy_dir = tmp / tag / name / "privacy"
            settings.client_name = name
            apps.append(ClinicApp(settings))
        return apps

    def dice(apps: list[ClinicApp], weights: list[np.ndarray]) -> dict[str, float]:
        out = {}
        for app in apps:
            out[app.settings.client_name] = app.validate(weights)["val_dice_mean"]
        out["mean"] = float(np.mean(list(out.values())))
        return out

    probe = make_apps("probe", None)
    result["seed_dice"] = dice(probe, seed)
    result["n_train"] = [len(a.train_cases) for a in probe]
    for m in args.honest:
        tic = time.monotonic()
        apps = make_apps(f"m{m}", m)
        weights = [np.asarray(w) for w in seed]
        eps: list[float] = []
        for k in range(1, args.rounds + 1):
            sums, metas = [], []
            for app in apps:
                values, meta = app.contribute(weights, {"round_id": f"r{k}"}, 3)
                sums.append(values)
                metas.append(meta)
            total = [np.sum([s[i] for s in sums], axis=0).view(np.uint64)
                     for i in range(len(weights))]
            ddp = {"scale": metas[0]["ddp_scale"], "learning_rate": args.lr}
            weights = SecAggServer._apply(weights, total, sum(m_["num_examples"] for m_ in metas),
                                          ddp)
            eps = [float(m_["epsilon"]) for m_ in metas]
            print(f"m={m} round {k}: {time.monotonic() - tic:.0f} s", file=sys.stderr)
        z = metas[0]["noise_multiplier"]
        label = f"m={metas[0]['honest_shares']}"  # the setting is capped at the threshold
        result["arms"][label] = {  # type: ignore[index]
            "honest_shares": metas[0]["honest_shares"], "noise_multiplier": z,
            "aggregate_std_over_clip": z * math.sqrt(3 / metas[0]["honest_shares"]),
            "epsilon": eps, "epsilon_if_alone": metas[0]["epsilon_if_alone"],
            "dice": dice(apps, weights), "seconds": round(time.monotonic() - tic, 1)}
        print(json.dumps(result["arms"][label]), file=sys.stderr)  # type: ignore[index]
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
