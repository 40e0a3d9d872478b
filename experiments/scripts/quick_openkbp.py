r"""Quick pooled training on the OpenKBP split, in-process, with held-out Dice on the way.

For choosing the OpenKBP study's configuration (docs/findings.md, "OpenKBP") before
spending the federated run on it: the clinic code's own training step
(:meth:`fedseg_clinic.app.ClinicApp.train`, the same sampler, loss and optimiser as a
federated clinic and ``fedseg baseline pooled``) on every clinic's training patients
pooled, scored every ``--every`` steps on the first ``--cases`` held-out patients
(sliding window with the training patch size, no overlap, as eval_openkbp.py). No FEDn.

Usage::

    python experiments/scripts/quick_openkbp.py --data $KBP_DATA --steps 600 --every 200 \
        --set learning_rate=0.01 --set patch_size=32,32,32 --model base_filters=8 \
        --out $KBP_DATA/quick/lr01.jsonl

``--set`` takes TrainingSettings fields (learning_rate, batch_size, patch_size,
foreground_fraction, hu_window, ...);
``--model`` the UNetConfig fields. One JSON line per evaluation goes to ``--out``; the
final weights to ``.<out stem>/weights.npz`` beside it. Pooling clinics that together
never contour an organ (``--clinics clinic-b``: no larynx) gives a model that labels only
the organs it was trained on, as ``eval_openkbp.py`` scores local models: the organs left
out are "not predicted" (null Dice in the JSON, "-" on the console).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _value(text: str) -> Any:
    """"0.01" -> 0.01, "32,32,32" -> [32, 32, 32], "true" -> True, else the string."""
    if "," in text:
        return [_value(part) for part in text.split(",")]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _pairs(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: expected KEY=VALUE, got {item!r}")
        out[key] = _value(value)
    return out


def main(argv: list[str] | None = None) -> int:
    """Train pooled in blocks of ``--every`` steps; score after each block."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=os.environ.get("KBP_DATA"),
                        help="the split's --out folder (default: $KBP_DATA)")
    parser.add_argument("--steps", type=int, required=True, help="total training steps")
    parser.add_argument("--every", type=int, required=True, help="score every N steps")
    parser.add_argument("--cases", type=int, default=6, help="held-out patients scored")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="training setting (a server per-round key)")
    parser.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                        help="UNetConfig field")
    parser.add_argument("--clinics", nargs="+", default=None,
                        help="clinics pooled (default: every folder of DATA/clinics)")
    parser.add_argument("--seed", type=int, default=31)
    parser.add_argument("--out", type=Path, required=True, help="JSON lines, one per score")
    args = parser.parse_args(argv)

    from fedseg.orchestration.baselines import build_pooled_folder
    from fedseg_clinic.app import ClinicApp
    from fedseg_clinic.cases import contoured_organs
    from fedseg_clinic.errors import FedsegError
    from fedseg_clinic.model.inference import allowed_classes, argmax_labels
    from fedseg_clinic.model.metrics import dice
    from fedseg_clinic.model.unet import UNetConfig, check_patch_size
    from fedseg_clinic.model.weights import save_weights_npz
    from fedseg_clinic.patches import load_cases
    from fedseg_clinic.settings import (
        ClinicSettings,
        PrivacySettings,
        TrainingSettings,
        ValidationSettings,
        validate_settings,
    )

    try:
        if args.data is None:
            raise FedsegError("give --data or set KBP_DATA")
        clinics_dir = args.data.resolve() / "clinics"
        if not clinics_dir.is_dir():
            raise FedsegError(f"{clinics_dir}: no clinics folder (give the --out folder of "
                              "split_openkbp.py as --data)")
        if args.steps < 1 or args.every < 1 or args.cases < 1:
            raise FedsegError(f"--steps, --every and --cases must be >= 1, got {args.steps}, "
                              f"{args.every}, {args.cases}")
        names = args.clinics or sorted(p.name for p in clinics_dir.iterdir() if p.is_dir())
        if not names:
            raise FedsegError(f"{clinics_dir}: no clinic folders")
        model = {"levels": 3, "base_filters": 8, "groups": 4, "organ_set": "head_neck",
                 **_pairs(args.model)}
        overrides = _pairs(args.set)
        known = {f.name for f in dataclasses.fields(TrainingSettings)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise FedsegError(f"--set: unknown training setting(s) {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(known))})")
        work = args.out.resolve().parent / f".{args.out.stem}"
        pooled = build_pooled_folder({n: clinics_dir / n for n in names}, work / "pooled")
        settings = ClinicSettings(
            model=model,
            training=TrainingSettings(seed=args.seed, **{
                k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}),
            privacy=PrivacySettings(enabled=False),
            data_dir=pooled, state_dir=work / "state", privacy_dir=work / "privacy",
            client_name="quick")
        validate_settings(settings, "--set/--model")
        # Before any training: a patch the U-Net cannot tile fails now, not at scoring.
        patch = check_patch_size(UNetConfig.from_dict(model), settings.training.patch_size)
        app = ClinicApp(settings)
        tiling = dataclasses.replace(settings, validation=ValidationSettings(
            patch_size=patch, overlap=0.0, batch_size=8))
        heldout = load_cases(clinics_dir / names[0], "val")[: args.cases]
        # Organs no pooled clinic contours were never trained: not predicted, not scored.
        trained = set(contoured_organs(pooled))
        excluded = [o for o in app.organs.organs if o not in trained]
        allowed = allowed_classes(app.organs, sorted(trained)) if excluded else None
        weights = [np.asarray(w) for w in app.model.get_weights()]
        print(f"pooled {len(app.train_cases)} train patients, {app.model.count_params()} "
              f"parameters, settings {overrides}, model {model}"
              + (f"; not predicted (no clinic contours them): {', '.join(excluded)}"
                 if excluded else ""), flush=True)
        done = 0
        started = time.monotonic()
        while done < args.steps:
            block = min(args.every, args.steps - done)
            tic = time.monotonic()
            cpu = time.process_time()
            weights, meta = app.train(weights, {"local_steps": block,
                                                "round_id": f"quick-{done}"})
            train_s, train_cpu = time.monotonic() - tic, time.process_time() - cpu
            done += block
            tic = time.monotonic()
            per_organ: dict[str, list[float]] = {o: [] for o in app.organs.organs}
            for case in heldout:
                pred = argmax_labels(app.predict_case(case, tiling), allowed)
                for index, organ in enumerate(app.organs.organs, start=1):
                    if organ in case.meta.labelled_organs and organ not in excluded:
                        per_organ[organ].append(dice(pred == index, case.masks[organ]))
            means = {o: round(float(np.mean(v)), 4) if v else math.nan
                     for o, v in per_organ.items()}
            finite = [v for v in means.values() if not math.isnan(v)]
            # JSON has no NaN: an organ not scored (absent from the held-out cases, or
            # not predicted) is null.
            row = {"step": done, "train_loss": round(meta["train_loss"], 4),
                   "dice": {o: None if math.isnan(v) else v for o, v in means.items()},
                   "mean": round(float(np.mean(finite)), 4) if finite else None,
                   "organs_excluded": excluded,
                   "train_seconds": round(train_s, 1), "train_cpu_seconds": round(train_cpu, 1),
                   "eval_seconds": round(time.monotonic() - tic, 1),
                   "wall_seconds": round(time.monotonic() - started, 1),
                   "load": os.getloadavg()[0], "settings": overrides, "model": model}
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            cells = " ".join(f"{o[:6]} " + ("-" if math.isnan(v) else f"{v:.2f}")
                             for o, v in means.items())
            print(f"step {done}: loss {row['train_loss']:.3f}  {cells}  mean "
                  f"{row['mean'] if row['mean'] is not None else math.nan:.3f}  "
                  f"({train_s:.0f} s train, {row['eval_seconds']:.0f} s "
                  f"eval, load {row['load']:.1f})", flush=True)
        save_weights_npz(weights, work / "weights.npz")
    except FedsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
