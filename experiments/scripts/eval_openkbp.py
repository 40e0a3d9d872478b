r"""Score the OpenKBP study's models on the held-out patients: Dice per organ per round.

The federated run validates nothing in its session (``session.validate: false`` in
experiments/studies/openkbp-fedavg.yaml): every clinic would score the same global model
on the same held-out patients. This scores each model once, in one process, on the first
``--cases`` held-out patients of the split (``split_openkbp.py``), by sliding-window
inference with the training patch size and no overlap (the cheapest tiling; the model's
GroupNorm sees windows of the size it was trained on).

Usage::

    python experiments/scripts/eval_openkbp.py --data $KBP_DATA --rounds 2 4 \\
        $KBP_DATA/runs/openkbp-fedavg $KBP_DATA/runs/openkbp-fedavg-pooled \\
        $KBP_DATA/runs/openkbp-fedavg-local --out $KBP_DATA/eval.json

Models: ``RUN/models/round-<k>.npz`` (federated, pooled) or
``RUN/models/<clinic>/round-<k>.npz`` (local-only: one model per clinic). Prints one
Markdown row per model (organs in the organ set's order, then the mean) and writes every
per-case Dice to ``--out``.

A model trained on part of the organ set - a local-only clinic model whose protocol lacks
some organs - labels only the organs it was trained on: the argmax runs over background
and those organs (fedseg_clinic.model.inference.argmax_labels), as ``fedseg predict``
does. Its organs come from the model record's ``organs_trained`` (``fedseg baseline local``
writes it) or, for a local model without one, from its clinic's training manifest under
``--data``. Organs it does not predict show "-" and are left out of its mean;
``--all-classes`` scores every output channel instead (the study's first table).
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

import numpy as np


def _models(run: Path, rounds: list[int]) -> list[tuple[str, int, Path]]:
    """(label, round, npz) of every model of ``rounds`` in a run folder."""
    found = []
    models = run / "models"
    for k in rounds:
        if (models / f"round-{k}.npz").is_file():
            found.append((run.name, k, models / f"round-{k}.npz"))
        for sub in sorted(p for p in models.iterdir() if p.is_dir()) if models.is_dir() else []:
            if (sub / f"round-{k}.npz").is_file():
                found.append((f"{run.name}/{sub.name}", k, sub / f"round-{k}.npz"))
    return found


def main(argv: list[str] | None = None) -> int:
    """Score models; prints a Markdown table, writes per-case Dice as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders")
    parser.add_argument("--data", type=Path, default=os.environ.get("KBP_DATA"),
                        help="the split's --out folder (default: $KBP_DATA)")
    parser.add_argument("--rounds", type=int, nargs="+", required=True)
    parser.add_argument("--cases", type=int, default=8,
                        help="first N held-out patients (default 8)")
    parser.add_argument("--out", type=Path, required=True, help="JSON of per-case Dice")
    parser.add_argument("--all-classes", action="store_true",
                        help="argmax over every output channel, trained organs or not")
    args = parser.parse_args(argv)
    from fedn.utils.helpers.helpers import get_helper

    from fedseg_clinic.app import ClinicApp
    from fedseg_clinic.cases import contoured_organs
    from fedseg_clinic.errors import FedsegError
    from fedseg_clinic.model.inference import allowed_classes, argmax_labels
    from fedseg_clinic.model.metrics import dice
    from fedseg_clinic.model.record import find_record, read_record, record_organs_trained
    from fedseg_clinic.settings import ValidationSettings

    try:
        if args.data is None:
            raise FedsegError("give --data or set KBP_DATA")
        todo = [m for run in args.runs for m in _models(run.resolve(), args.rounds)]
        if not todo:
            raise FedsegError(f"no models of rounds {args.rounds} in {args.runs}")
        results: list[dict[str, object]] = []
        apps: dict[Path, ClinicApp] = {}
        for label, k, npz in todo:
            run = npz.parents[1] if npz.parent.name == "models" else npz.parents[2]
            if run not in apps:
                # Any clinic's settings file of the run: model, organ set, HU window,
                # patch size; the data folder is clinic-a's (its val split = held-out).
                settings = sorted((run / "settings").glob("*.yaml"))[0]
                os.environ.update(FEDSEG_SETTINGS=str(settings),
                                  FEDSEG_DATA_DIR=str(args.data / "clinics" / "clinic-a"),
                                  FEDSEG_STATE_DIR=str(args.out.parent / ".eval-state"),
                                  FEDSEG_PRIVACY_DIR=str(args.out.parent / ".eval-state"))
                apps[run] = ClinicApp.from_environment()
            app = apps[run]
            tiling = dataclasses.replace(app.settings, validation=ValidationSettings(
                patch_size=tuple(app.settings.training.patch_size), overlap=0.0,
                batch_size=8))
            app._apply_global(get_helper("numpyhelper").load(str(npz)))
            trained, source = None, "all organs"
            if not args.all_classes:
                record = find_record(npz)
                if record is not None:
                    trained = record_organs_trained(read_record(record), app.model_config,
                                                    str(record))
                    source = f"record {record.name}"
                if trained is None and npz.parent.name != "models":
                    # A local model of a run recorded before organs_trained: its clinic's
                    # protocol, as the clinic's training manifest shows it.
                    trained = contoured_organs(args.data / "clinics" / npz.parent.name)
                    source = f"manifest of {npz.parent.name}"
            allowed = allowed_classes(app.organs, trained)
            excluded = [o for o in app.organs.organs if trained is not None and o not in trained]
            if excluded:
                print(f"  {label}: trained on {', '.join(trained or ())} ({source}); "
                      f"not predicted: {', '.join(excluded)}", file=sys.stderr, flush=True)
            tic = time.monotonic()
            per_organ: dict[str, list[float]] = {o: [] for o in app.organs.organs}
            # Predicted / true voxels per organ: tells "predicts nothing" from "misplaced".
            voxels: dict[str, list[int]] = {o: [0, 0] for o in app.organs.organs}
            for case in app.val_cases[: args.cases]:
                pred = argmax_labels(app.predict_case(case, tiling), allowed)
                for index, organ in enumerate(app.organs.organs, start=1):
                    if organ in case.meta.labelled_organs and organ not in excluded:
                        per_organ[organ].append(dice(pred == index, case.masks[organ]))
                        voxels[organ][0] += int((pred == index).sum())
                        voxels[organ][1] += int(case.masks[organ].sum())
            means = {o: (float(np.nanmean(v)) if v else math.nan) for o, v in per_organ.items()}
            finite = [v for v in means.values() if not math.isnan(v)]
            row = {"model": label, "round": k, "dice": means,
                   "mean": float(np.mean(finite)) if finite else math.nan,
                   "n": {o: len(v) for o, v in per_organ.items()}, "per_case": per_organ,
                   "voxels_pred_true": voxels,
                   "organs_excluded": excluded, "organs_trained_from": source,
                   "seconds": round(time.monotonic() - tic, 1)}
            results.append(row)
            cells = " | ".join("-" if o in excluded else f"{means[o]:.2f}"
                               for o in app.organs.organs)
            print(f"| {label} | {k} | {cells} | {row['mean']:.2f} |", flush=True)
            args.out.write_text(json.dumps(results, indent=1))
    except FedsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
