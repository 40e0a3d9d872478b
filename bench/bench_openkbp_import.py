"""Benchmark + check: import every OpenKBP patient (NIfTI CT + one mask per structure).

Imports ``<open-kbp>/train-pats`` and ``validation-pats`` (203 real head-and-neck
patients, read in place) with ``--organ-set head_neck`` and the default crop, then checks
every case: each organ's volume in cc must equal the mask file's non-zero voxel count
times its voxel volume. Prints patients, seconds, cases with a volume mismatch, errors,
and how many patients have each organ.
Run: .venv/bin/python bench/bench_openkbp_import.py /path/to/open-kbp
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import nibabel
import numpy as np

from fedseg_clinic.cases import read_case
from fedseg_clinic.imaging.importer import ImportOptions, pseudonym
from fedseg_clinic.imaging.volumes import import_volume_clinic

NAMES = {"SpinalCord": "spinal_cord", "Brainstem": "brainstem", "LeftParotid": "parotid_left",
         "RightParotid": "parotid_right", "Esophagus": "esophagus", "Larynx": "larynx",
         "Mandible": "mandible"}


def main(root: Path) -> int:
    mismatches, errors, organs, patients = 0, 0, Counter(), 0
    with tempfile.TemporaryDirectory() as tmp:
        for split in ("train-pats", "validation-pats"):
            started = time.perf_counter()
            out = Path(tmp) / split
            report = import_volume_clinic(root / split, out,
                                          ImportOptions(organ_set="head_neck", salt="bench"))
            seconds = time.perf_counter() - started
            errors += sum(1 for p in report.problems if p.severity == "error")
            for p in report.problems:
                if p.severity == "error":
                    print(p.line())
            for folder in sorted(p for p in (root / split).iterdir() if p.is_dir()):
                patients += 1
                case_id = "case-" + pseudonym("bench", "volume", folder.name)
                case = read_case(out / case_id)
                for mask_file in sorted((folder / "segmentations").iterdir()):
                    image = nibabel.load(mask_file)
                    expected = np.count_nonzero(np.asanyarray(image.dataobj)) * float(
                        np.prod(image.header.get_zooms()[:3])) / 1000.0
                    organ = NAMES[mask_file.name.removesuffix(".nii.gz")]
                    mask = case.masks.get(organ)
                    got = 0.0 if mask is None else mask.sum() * float(
                        np.prod(case.meta.spacing)) / 1000.0
                    organs[organ] += mask is not None
                    if abs(got - expected) > 1e-6 * max(expected, 1.0):
                        mismatches += 1
                        print(f"{folder.name} {organ}: {got:.3f} cc vs {expected:.3f} cc")
            print(f"{split}: {len(report.cases)} cases in {seconds:.1f} s "
                  f"({seconds / max(len(report.cases), 1):.2f} s/patient), "
                  f"{len(report.failed)} failed")
    print(f"patients {patients}, volume mismatches {mismatches}, errors {errors}")
    print("organs: " + ", ".join(f"{o} {n}" for o, n in organs.most_common()))
    return 1 if mismatches or errors else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
