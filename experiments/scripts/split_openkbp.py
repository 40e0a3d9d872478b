"""Split OpenKBP into non-iid, unbalanced clinic folders plus a held-out validation set.

The real-data study of docs/findings.md ("OpenKBP: FedAvg vs pooled vs local-only").
OpenKBP does not record each patient's institution, so clinics are consecutive blocks
of the train patients in the data set's own numbering (pt_N, N ascending). Each clinic
gets a *contouring protocol*: the structures it contours. A structure outside the
protocol is left out of the import, so the case records it as unknown (not absent) and
training masks it out of the loss, exactly as for a structure the clinic never drew.
The held-out validation set is the first ``--heldout`` patients of OpenKBP's own
validation split with every structure they have; every clinic folder holds the same
held-out cases as its ``val`` split, so each arm (FedAvg, pooled, local-only) is scored
on the same patients.

Usage (data paths by argument or environment, nothing is written into the repository)::

    python experiments/scripts/split_openkbp.py --src $OPENKBP_DIR --out $WORK/kbp-data
    # -> $WORK/kbp-data/clinics/clinic-{a,b,c,d}/ (data.clinics of openkbp-fedavg.yaml)

Why symlinks: the staging folders only choose which mask files a clinic "has"; the
importer follows symlinked files, and the clinic folders link the imported case folders
(the same patients must not be stored twice).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

from fedseg_clinic.cases import (
    Manifest,
    ManifestEntry,
    read_manifest,
    write_manifest,
)
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.imaging.importer import ImportOptions
from fedseg_clinic.imaging.volumes import import_volume_clinic

ALL_ROIS = ("Brainstem", "SpinalCord", "LeftParotid", "RightParotid", "Esophagus",
            "Larynx", "Mandible")

# (clinic, number of train patients, structures it contours). Unbalanced 70/50/32/18 of
# the 170 train patients; protocols differ the way real clinics' do (a large centre
# contours everything, others only what their plans need).
CLINICS: tuple[tuple[str, int, tuple[str, ...]], ...] = (
    ("clinic-a", 70, ALL_ROIS),
    ("clinic-b", 50, ("Brainstem", "SpinalCord", "LeftParotid", "RightParotid", "Mandible")),
    ("clinic-c", 32, ("SpinalCord", "LeftParotid", "RightParotid", "Esophagus", "Larynx")),
    ("clinic-d", 18, ("Brainstem", "SpinalCord", "LeftParotid", "RightParotid")),
)


def patient_folders(split_dir: Path) -> list[Path]:
    """OpenKBP patient folders (pt_N with a ct.nii.gz) in ascending N."""
    if not split_dir.is_dir():
        raise FedsegError(f"{split_dir}: not a folder (expected OpenKBP's train-pats/"
                          "validation-pats)")
    found = [p for p in split_dir.iterdir()
             if re.fullmatch(r"pt_\d+", p.name) and (p / "ct.nii.gz").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def stage(patients: list[Path], rois: tuple[str, ...], dest: Path) -> None:
    """Link each patient's CT and the masks of ``rois`` it has into ``dest/pt_N/``."""
    for pt in patients:
        seg = dest / pt.name / "segmentations"
        seg.mkdir(parents=True)
        os.symlink(pt / "ct.nii.gz", dest / pt.name / "ct.nii.gz")
        for roi in rois:
            mask = pt / "segmentations" / f"{roi}.nii.gz"
            if mask.is_file():
                os.symlink(mask, seg / mask.name)


def import_staged(staged: Path, out: Path, name: str, spacing: tuple[float, float, float],
                  ) -> Path:
    """Import one staging folder (every case in split train) into ``out``."""
    options = ImportOptions(clinic=name, spacing=spacing, val_fraction=0.0, seed=0,
                            organ_set="head_neck")
    report = import_volume_clinic(staged, out, options)
    for problem in report.problems:
        print(problem.line(), file=sys.stderr)
    print(f"{name}: imported {len(report.cases)} case(s) into {out}")
    return out


def assemble(name: str, train_dir: Path, heldout_dir: Path, dest: Path) -> dict[str, object]:
    """A clinic folder: links to its train cases and to the held-out cases (split val)."""
    dest.mkdir(parents=True)
    train, heldout = read_manifest(train_dir), read_manifest(heldout_dir)
    entries: list[ManifestEntry] = []
    for src, manifest, split in ((train_dir, train, "train"), (heldout_dir, heldout, "val")):
        for entry in manifest.cases:
            os.symlink(src / entry.case_id, dest / entry.case_id)
            entries.append(ManifestEntry(entry.case_id, split, entry.labelled_organs,
                                         entry.shape))
    write_manifest(Manifest(clinic=name, cases=entries, extra=dict(train.extra)), dest)
    counts: dict[str, int] = {}
    for entry in train.cases:
        for organ in entry.labelled_organs:
            counts[organ] = counts.get(organ, 0) + 1
    return {"clinic": name, "n_train": len(train.cases), "n_val": len(heldout.cases),
            "train_patients_labelled": dict(sorted(counts.items()))}


def main(argv: list[str] | None = None) -> int:
    """Build the study's clinic folders; prints and writes ``OUT/split.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=os.environ.get("OPENKBP_DIR"),
                        help="OpenKBP folder with train-pats/ and validation-pats/ "
                             "(default: $OPENKBP_DIR)")
    parser.add_argument("--out", type=Path, required=True,
                        help="work folder (outside the repository); must not exist")
    parser.add_argument("--heldout", type=int, default=16,
                        help="held-out validation patients: the first N of "
                             "validation-pats (default 16 of 33, for validation time)")
    parser.add_argument("--spacing", type=float, nargs=3, default=(3.0, 4.0, 4.0),
                        metavar=("Z", "Y", "X"), help="import spacing in mm (3 4 4)")
    parser.add_argument("--clinic-sizes", type=int, nargs=len(CLINICS),
                        default=[n for _, n, _ in CLINICS], metavar="N",
                        help="train patients per clinic, in clinic order (default "
                             f"{' '.join(str(n) for _, n, _ in CLINICS)}; smaller for a "
                             "quick check)")
    args = parser.parse_args(argv)
    try:
        if any(n < 1 for n in args.clinic_sizes):
            raise FedsegError(f"--clinic-sizes {args.clinic_sizes}: every clinic needs at "
                              "least 1 train patient")
        clinics = [(name, n, rois) for (name, _, rois), n
                   in zip(CLINICS, args.clinic_sizes, strict=True)]
        if args.src is None:
            raise FedsegError("give --src or set OPENKBP_DIR")
        out: Path = args.out.resolve()
        if out.exists():
            raise FedsegError(f"{out}: exists; remove it or give another --out")
        train = patient_folders(args.src / "train-pats")
        val = patient_folders(args.src / "validation-pats")[: args.heldout]
        if sum(n for _, n, _ in clinics) > len(train):
            raise FedsegError(f"{args.src}: {len(train)} train patients, the split needs "
                              f"{sum(n for _, n, _ in clinics)}")
        spacing = tuple(args.spacing)
        stage(val, ALL_ROIS, out / "staging" / "heldout")
        heldout = import_staged(out / "staging" / "heldout", out / "import" / "heldout",
                                "heldout", spacing)
        summary = []
        start = 0
        for name, n, rois in clinics:
            patients = train[start:start + n]
            start += n
            stage(patients, rois, out / "staging" / name)
            imported = import_staged(out / "staging" / name, out / "import" / name, name,
                                     spacing)
            info = assemble(name, imported, heldout, out / "clinics" / name)
            info.update(patients=f"{patients[0].name}..{patients[-1].name}",
                        contours=list(rois))
            summary.append(info)
            print(json.dumps(info))
        shutil.rmtree(out / "staging")
        record = {"src": str(args.src), "spacing": list(spacing),
                  "heldout": [p.name for p in val], "clinics": summary}
        (out / "split.json").write_text(json.dumps(record, indent=2))
    except FedsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
