"""Benchmark: DICOM import throughput (slices/s, patients/s) of fedseg_clinic.imaging.importer.

Writes a folder of synthetic DICOM patients (CT slices of an elliptic body with a
"heart" ellipse, plus an RTSTRUCT with BODY and Heart contours on every slice) with a
minimal pydicom writer kept in this script, then times ``import_clinic`` on it, in a
fresh subprocess per configuration so peak RSS (ru_maxrss) is its own. CPU seconds
(process_time) are reported beside wall seconds because the machine is shared.

Usage: .venv/bin/python bench/bench_import.py [--patients 4] [--slices 64] [--size 512]
           [--workdir DIR] [--markdown FILE]
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

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

CONFIGS: dict[str, dict[str, object]] = {
    "native, crop": {"crop": True, "spacing": None},
    "native, no crop": {"crop": False, "spacing": None},
    "crop + resample 2x2x2 mm": {"crop": True, "spacing": (2.0, 2.0, 2.0)},
}


def _dataset(sop_class: str, study: str, series: str, patient: str, modality: str
             ) -> pydicom.Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = patient
    ds.PatientName = patient
    ds.Modality = modality
    return ds


def _ellipse(cx: float, cy: float, rx: float, ry: float, z: float, n: int = 64) -> list[str]:
    angles = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    points = np.column_stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles),
                              np.full(n, z)])
    return [f"{v:.2f}" for v in points.ravel()]


def write_patient(folder: Path, patient: str, slices: int, size: int) -> None:
    """One synthetic CT series (1 mm pixels, 2.5 mm slices) and its RTSTRUCT."""
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[0:size, 0:size]
    c = size / 2.0
    body = ((xx - c) / (0.4 * size)) ** 2 + ((yy - c) / (0.3 * size)) ** 2 <= 1.0
    heart = ((xx - c) / (0.08 * size)) ** 2 + ((yy - c) / (0.08 * size)) ** 2 <= 1.0
    pixels = np.where(body, 1064, 24).astype(np.uint16)  # HU 40 / -1000 after intercept
    pixels[heart] = 1084
    sops = []
    origin = -c
    for k in range(slices):
        ds = _dataset(CTImageStorage, study, series, patient, "CT")
        ds.FrameOfReferenceUID = frame
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin, origin, 2.5 * k]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 2.5
        ds.InstanceNumber = slices - k
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = 1
        ds.RescaleIntercept = -1024
        noise = np.random.default_rng(k).integers(0, 20, pixels.shape, dtype=np.uint16)
        ds.PixelData = (pixels + noise).tobytes()
        ds.save_as(folder / f"ct_{k:04d}.dcm", enforce_file_format=True)
        sops.append(ds.SOPInstanceUID)
    rt = _dataset(RTStructureSetStorage, study, generate_uid(), patient, "RTSTRUCT")
    ref_series = pydicom.Dataset()
    ref_series.SeriesInstanceUID = series
    ref_series.ContourImageSequence = []
    for sop in sops:
        item = pydicom.Dataset()
        item.ReferencedSOPClassUID = CTImageStorage
        item.ReferencedSOPInstanceUID = sop
        ref_series.ContourImageSequence.append(item)
    ref_study = pydicom.Dataset()
    ref_study.RTReferencedSeriesSequence = [ref_series]
    ref_frame = pydicom.Dataset()
    ref_frame.FrameOfReferenceUID = frame
    ref_frame.RTReferencedStudySequence = [ref_study]
    rt.ReferencedFrameOfReferenceSequence = [ref_frame]
    rt.StructureSetROISequence = []
    rt.ROIContourSequence = []
    for number, (name, rx, ry) in enumerate(
        [("BODY", 0.4 * size, 0.3 * size), ("Heart", 0.08 * size, 0.08 * size)], start=1
    ):
        roi = pydicom.Dataset()
        roi.ROINumber = number
        roi.ROIName = name
        roi.ReferencedFrameOfReferenceUID = frame
        rt.StructureSetROISequence.append(roi)
        roi_contour = pydicom.Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ContourSequence = []
        for k in range(slices):
            contour = pydicom.Dataset()
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.ContourData = _ellipse(0.0, 0.0, rx, ry, 2.5 * k)
            contour.NumberOfContourPoints = len(contour.ContourData) // 3
            roi_contour.ContourSequence.append(contour)
        rt.ROIContourSequence.append(roi_contour)
    rt.save_as(folder / "rtstruct.dcm", enforce_file_format=True)


def _child(src: Path, out: Path, config: dict[str, object]) -> None:
    """Run one import and print its timing as JSON (runs in a subprocess)."""
    from fedseg_clinic.imaging.importer import ImportOptions, import_clinic

    spacing = config["spacing"]
    options = ImportOptions(crop=bool(config["crop"]),
                            spacing=tuple(spacing) if spacing else None)  # type: ignore[arg-type]
    start, cpu_start = time.perf_counter(), time.process_time()
    report = import_clinic(src, out, options)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "cases": len(report.cases),
                      "slices": report.slices, "ok": report.ok, "rss_mb": rss_mb}))


def main() -> None:
    """Write the synthetic clinic, import it once per configuration, print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None,
                        help="Also write the table to this file.")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(Path(args.child[0]), Path(args.child[1]), json.loads(args.child[2]))
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src = Path(tmp) / "src"
        start = time.perf_counter()
        for i in range(args.patients):
            write_patient(src / f"patient{i}", f"BENCH{i:03d}", args.slices, args.size)
        write_s = time.perf_counter() - start
        rows = [
            "| config | patients | slices | wall s | CPU s | slices/s (wall) | patients/s (wall) "
            "| peak RSS MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, config in CONFIGS.items():
            out = Path(tmp) / f"out-{len(rows)}"
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(src), str(out), json.dumps(config)],
                check=True, capture_output=True, text=True,
            )
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            assert result["ok"] and result["cases"] == args.patients, result
            rows.append(
                f"| {name} | {result['cases']} | {result['slices']} | {result['seconds']:.2f} "
                f"| {result['cpu_seconds']:.2f} "
                f"| {result['slices'] / result['seconds']:.0f} "
                f"| {result['cases'] / result['seconds']:.2f} | {result['rss_mb']:.0f} |"
            )
    header = (f"{args.patients} patients x {args.slices} slices of {args.size}x{args.size} "
              f"(writing the DICOM took {write_s:.1f} s)")
    table = "\n".join([header, "", *rows])
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
