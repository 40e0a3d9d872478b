"""Real-world DICOM exports: compressed CT, localisers and several series, enhanced
multi-frame CT, regenerated UIDs, degenerate contours and symlinked folders.

Every case is built from the real scanner files in the shared data folder: a real series
is copied to tmp_path and re-encoded or modified with pydicom (and highdicom for the
enhanced CT); the tests skip when that folder is absent.
"""

from __future__ import annotations

import io
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import jpeg_lossless
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import _PIXEL_DATA_DECODERS
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from fedseg.cli import cli
from fedseg_clinic.cases import read_case
from fedseg_clinic.errors import FedsegError
from fedseg_clinic.imaging.importer import ImportOptions, ImportReport, import_clinic
from fedseg_clinic.imaging.series import read_series, scan_folder
from fedseg_clinic.organs import AliasTable

CT3 = Path("dcmqi/data/segmentations/ct-3slice")
MOCK = Path("rt-utils/tests/mock_data")
ALIASES = AliasTable({"heart": ["ROI-1"]})


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner(mix_stderr=False).invoke(cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.stdout, result.stderr


def _set_encapsulated(ds: pydicom.Dataset, frames: list[bytes], syntax: str) -> None:
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True


def _j2k(ds: pydicom.Dataset, lossy: bool) -> bytes:
    """A JPEG 2000 codestream of the slice (pydicom + pylibjpeg-openjpeg)."""
    copy = pydicom.Dataset(ds)
    copy.file_meta = pydicom.dataset.FileMetaDataset(ds.file_meta)
    copy.compress(JPEG2000 if lossy else JPEG2000Lossless, **({"j2k_cr": [10]} if lossy else {}))
    return pydicom.encaps.get_frame(copy.PixelData, 0)


def _jpeg_8bit(ds: pydicom.Dataset, extended: bool) -> None:
    """Window the slice to 8 bits (10 HU per level) and encode it as baseline JPEG (Pillow).

    Process 2 (extended, 8-bit) has the same syntax as baseline with an SOF1 marker.
    """
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    stored = np.clip(np.rint((hu + 1024.0) / 10.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95)
    stream = buffer.getvalue()
    if extended:
        stream = stream.replace(b"\xff\xc0", b"\xff\xc1", 1)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.RescaleSlope, ds.RescaleIntercept = 10, -1024
    ds.PhotometricInterpretation = "MONOCHROME2"
    _set_encapsulated(ds, [stream], JPEGExtended12Bit if extended else JPEGBaseline8Bit)


def _encode(ds: pydicom.Dataset, syntax: str) -> None:
    """Re-encode a CT slice (in place) in a transfer syntax."""
    stored = ds.pixel_array
    if syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian,
                  DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    elif syntax == ExplicitVRBigEndian:
        ds.file_meta.TransferSyntaxUID = UID(syntax)
        ds.PixelData = stored.astype(stored.dtype.newbyteorder(">")).tobytes()
    elif syntax in (RLELossless, JPEGLSLossless, JPEG2000Lossless):
        ds.compress(syntax)
    elif syntax == JPEGLSNearLossless:
        ds.compress(syntax, jls_error=3)
    elif syntax == JPEG2000:
        ds.compress(syntax, j2k_cr=[10])
    elif syntax in (JPEGLosslessSV1, JPEGLossless):
        # Our own encoder (no JPEG lossless encoder exists for pydicom); the non-SV1
        # syntax gets predictor 4 (a + b - c) so that it is not the SV1 stream relabelled.
        bits = stored.view(np.uint16) if stored.dtype == np.int16 else stored
        _set_encapsulated(ds, [jpeg_lossless.encode(bits, 16, 1 if syntax == JPEGLosslessSV1
                                                    else 4)], syntax)
    elif syntax in (HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K):
        # No HTJ2K encoder is installed: a Part 1 codestream (which HTJ2K decoders must
        # read) under the HTJ2K UID exercises the decoder lookup for these syntaxes.
        _set_encapsulated(ds, [_j2k(ds, lossy=syntax == HTJ2K)], syntax)
    elif syntax in (JPEGBaseline8Bit, JPEGExtended12Bit):
        _jpeg_8bit(ds, extended=syntax == JPEGExtended12Bit)
    else:
        raise AssertionError(f"no encoder for {syntax}")


def _save(ds: pydicom.Dataset, path: Path) -> None:
    if ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian:
        pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    else:
        ds.save_as(path, enforce_file_format=True)


def _copy_encoded(src: Path, dst: Path, names: list[str], syntax: str,
                  change: Callable[[pydicom.Dataset], None] | None = None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        ds = pydicom.dcmread(src / name)
        if name.startswith(("ct", "0")):
            _encode(ds, syntax)
        if change is not None:
            change(ds)
        _save(ds, dst / name)
    return dst


# Lossless: identical HU. Lossy: the largest and the mean HU error allowed.
LOSSLESS = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
            ExplicitVRBigEndian, RLELossless, JPEGLosslessSV1, JPEGLossless, JPEGLSLossless,
            JPEG2000Lossless, HTJ2KLossless, HTJ2KLosslessRPCL]
LOSSY = {JPEGLSNearLossless: (3.0, 3.0), JPEG2000: (400.0, 20.0), HTJ2K: (400.0, 20.0),
         JPEGBaseline8Bit: (100.0, 15.0), JPEGExtended12Bit: (100.0, 15.0)}
CT3_NAMES = ["01.dcm", "02.dcm", "03.dcm"]


def test_every_decodable_syntax_is_tested() -> None:
    """The pinned plugins decode exactly the syntaxes below (each has a test)."""
    available = {uid for uid in _PIXEL_DATA_DECODERS if get_decoder(uid).is_available}
    assert available == set(LOSSLESS) | set(LOSSY)


@pytest.mark.parametrize("syntax", LOSSLESS, ids=lambda u: UID(u).keyword)
def test_lossless_series_same_hu(shared_data: Path, tmp_path: Path, syntax: str) -> None:
    plain = read_series([shared_data / CT3 / n for n in CT3_NAMES])
    folder = _copy_encoded(shared_data / CT3, tmp_path, CT3_NAMES, syntax)
    assert pydicom.dcmread(folder / "01.dcm").file_meta.TransferSyntaxUID == syntax
    encoded = read_series([f.path for f in scan_folder(folder).dicom])
    assert encoded.geometry == plain.geometry
    assert np.array_equal(encoded.hu, plain.hu)
    assert encoded.hu.min() == -3024 and encoded.hu.max() == 1381


@pytest.mark.parametrize("syntax", list(LOSSY), ids=lambda u: UID(u).keyword)
def test_lossy_slice_decodes(shared_data: Path, tmp_path: Path, syntax: str) -> None:
    plain = read_series([shared_data / CT3 / "01.dcm"]).hu
    folder = _copy_encoded(shared_data / CT3, tmp_path, ["01.dcm"], syntax)
    hu = read_series([folder / "01.dcm"]).hu
    if syntax in (JPEGBaseline8Bit, JPEGExtended12Bit):
        plain = np.clip(np.rint((plain + 1024) / 10), 0, 255) * 10 - 1024  # the 8-bit window
    error = np.abs(hu - plain)
    assert 0 < error.max() <= LOSSY[syntax][0]
    assert error.mean() <= LOSSY[syntax][1]


def test_real_12bit_jpeg_extended_stream(shared_data: Path, tmp_path: Path) -> None:
    """A real 12-bit JPEG Extended (process 4) codestream, decoded at 12-bit precision.

    No 12-bit JPEG encoder is installed; pydicom ships a real one (``JPGExtended.dcm``, an
    NM image from GDCM's test data, SOF1 with 12-bit samples). Its codestream becomes the
    pixel data of the real CT slices, so the CT path - not pydicom's own - decodes it.
    The expected samples are pydicom's published reference values for that file.
    """
    source = pydicom.dcmread(pydicom.data.get_testdata_file("JPGExtended.dcm"))
    stream = pydicom.encaps.get_frame(source.PixelData, 0)
    sof1 = stream.index(b"\xff\xc1")
    assert stream[sof1 + 4] == 12  # the frame header's sample precision

    def twelve_bit(ds: pydicom.Dataset) -> None:
        ds.Rows, ds.Columns = int(source.Rows), int(source.Columns)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PhotometricInterpretation = "MONOCHROME2"
        _set_encapsulated(ds, [stream], JPEGExtended12Bit)

    folder = _copy_encoded(shared_data / CT3, tmp_path, CT3_NAMES, ExplicitVRLittleEndian,
                           change=twelve_bit)
    hu = read_series([f.path for f in scan_folder(folder).dicom]).hu
    assert hu.shape == (3, 1024, 256)
    for k in range(3):
        assert hu[k, 420, 140] == 244 - 1024 and hu[k, 230, 120] == 95 - 1024
    assert hu.max() > 255 - 1024  # samples above 8 bits survive


def test_compressed_import_same_case(shared_data: Path, tmp_path: Path) -> None:
    """CT + RTSTRUCT with JPEG lossless slices import to the same image and mask."""
    names = ["ct_1.dcm", "ct_2.dcm", "rt.dcm"]
    plain_src = tmp_path / "plain"
    plain_src.mkdir()
    for name in names:
        shutil.copy(shared_data / MOCK / name, plain_src / name)
    jpeg_src = _copy_encoded(shared_data / MOCK, tmp_path / "jpeg", names, JPEGLosslessSV1)
    cases = []
    for src in (plain_src, jpeg_src):
        report = import_clinic(src, tmp_path / f"out-{src.name}",
                               ImportOptions(aliases=ALIASES, salt="s"))
        assert report.ok, [p.line() for p in report.problems]
        cases.append(read_case(tmp_path / f"out-{src.name}" / report.cases[0]))
    assert np.array_equal(cases[0].image, cases[1].image)
    assert np.array_equal(cases[0].masks["heart"], cases[1].masks["heart"])
    assert int(cases[1].masks["heart"].sum()) == pytest.approx(1443, rel=0.02)


@pytest.mark.parametrize("syntax, label", [
    ("1.2.840.10008.1.2.4.110", "transfer syntax 1.2.840.10008.1.2.4.110 cannot be decoded"),
    ("1.2.840.10008.1.2.4.100", "transfer syntax MPEG2 Main Profile / Main Level "
                                "(1.2.840.10008.1.2.4.100) cannot be decoded"),
])
def test_undecodable_syntax_refused(shared_data: Path, tmp_path: Path, syntax: str,
                                    label: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in CT3_NAMES:
        shutil.copy(shared_data / CT3 / name, src / name)
    ds = pydicom.dcmread(src / "02.dcm")
    _set_encapsulated(ds, [b"\xff\x0a" + bytes(64)], syntax)
    pydicom.dcmwrite(src / "02.dcm", ds, implicit_vr=False, little_endian=True,
                     force_encoding=True)
    code, stdout, stderr = _run("data", "import", str(src), "--out", str(tmp_path / "out"))
    assert code == 1 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{src / '02.dcm'}: {label}" in errors[0], stderr
    assert "imported 0 case(s)" in stdout


def test_corrupt_compressed_slice_is_one_line(shared_data: Path, tmp_path: Path) -> None:
    folder = _copy_encoded(shared_data / CT3, tmp_path, ["01.dcm"], JPEGLSLossless)
    ds = pydicom.dcmread(folder / "01.dcm")
    _set_encapsulated(ds, [b"\xff\xd8" + bytes(4000)], JPEGLSLossless)
    ds.save_as(folder / "01.dcm")
    with pytest.raises(FedsegError) as info:
        read_series([folder / "01.dcm"])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{folder / '01.dcm'}: cannot decode pixel data (JPEG-LS "
                              "Lossless Image Compression (1.2.840.10008.1.2.4.80)): ")


# --- helpers for the series, UID and contour cases ------------------------------------


def _copy_mock(shared_data: Path, dst: Path, names: tuple[str, ...] = ("ct_1.dcm", "ct_2.dcm",
                                                                         "rt.dcm")) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(shared_data / MOCK / name, dst / name)
    return dst


def _rewrite(path: Path, change: Callable[[pydicom.Dataset], None],
             dst: Path | None = None) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the real rt.dcm carries an invalid UI value
        ds.save_as(dst or path)


def _new_instance(ds: pydicom.Dataset) -> None:
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _import(src: Path, out: Path) -> tuple[ImportReport, list[str]]:
    opts = ImportOptions(aliases=ALIASES, crop=False, salt="s")
    report = import_clinic(src, out, opts)
    return report, [p.line() for p in report.problems]


def _heart(out: Path, case_id: str) -> int:
    return int(read_case(out / case_id).masks["heart"].sum())


# --- localisers and several series ------------------------------------------------------


def _scout(src_slice: Path, dst: Path, series_uid: str | None) -> None:
    """A coronal projection image made from a real slice, not flagged LOCALIZER."""
    def change(ds: pydicom.Dataset) -> None:
        _new_instance(ds)
        ds.SeriesInstanceUID = series_uid or generate_uid()
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    _rewrite(src_slice, change, dst)


@pytest.mark.parametrize("same_series", [False, True])
def test_unflagged_scout_is_left_out(shared_data: Path, tmp_path: Path,
                                     same_series: bool) -> None:
    src = tmp_path / "src"
    shutil.copytree(shared_data / CT3, src)
    series_uid = str(pydicom.dcmread(src / "01.dcm").SeriesInstanceUID)
    _scout(src / "02.dcm", src / "scout.dcm", series_uid if same_series else None)
    report, lines = _import(src, tmp_path / "out")
    assert report.ok and len(report.cases) == 1, lines
    case = read_case(tmp_path / "out" / report.cases[0])
    assert case.meta.shape == (3, 512, 512) and case.meta.source_series_uid == series_uid
    notes = [line for line in lines if line.startswith("note:")]
    assert len(notes) == 1 and "(3 axial slice(s)" in notes[0]
    assert "the largest axial stack" in notes[0] and "left out:" in notes[0]
    assert "(1 coronal slice(s)" in notes[0]
    assert (" part 1 " in notes[0]) == same_series
    assert case.meta.extra["series_choice"].startswith(series_uid)


def _second_series(src: Path, names: list[str], dst: Path, **changes: object) -> str:
    """Copies of some slices as another series of the same study; returns its UID."""
    series_uid = generate_uid()
    dst.mkdir(parents=True, exist_ok=True)

    def change(ds: pydicom.Dataset) -> None:
        _new_instance(ds)
        ds.SeriesInstanceUID = series_uid
        for key, value in changes.items():
            setattr(ds, key, value)
    for name in names:
        _rewrite(src / name, change, dst / name)
    return series_uid


def test_largest_axial_series_is_picked(shared_data: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(shared_data / CT3, src / "full")
    second = _second_series(src / "full", ["01.dcm", "02.dcm"], src / "partial")
    report, lines = _import(src, tmp_path / "out")
    assert report.ok and len(report.cases) == 1, lines
    case = read_case(tmp_path / "out" / report.cases[0])
    assert case.meta.shape[0] == 3 and case.meta.source_series_uid != second
    assert any(line.startswith("note:") and f"left out: {second} (2 axial" in line
               for line in lines)


def test_rtstruct_series_beats_larger_series(shared_data: Path, tmp_path: Path) -> None:
    """A 3-slice copy of the study beside the 2 labelled slices: the labelled one wins."""
    src = _copy_mock(shared_data, tmp_path / "src" / "planning")
    ct = pydicom.dcmread(src / "ct_1.dcm")
    other = _second_series(src, ["ct_1.dcm", "ct_2.dcm"], tmp_path / "src" / "recon")
    _rewrite(src / "ct_2.dcm", lambda ds: (_new_instance(ds), setattr(
        ds, "SeriesInstanceUID", other), setattr(ds, "ImagePositionPatient", [-125, -125, 70])),
        tmp_path / "src" / "recon" / "ct_3.dcm")
    report, lines = _import(tmp_path / "src", tmp_path / "out")
    assert report.ok and len(report.cases) == 1, lines
    case_id = report.cases[0]
    assert read_case(tmp_path / "out" / case_id).meta.source_series_uid == ct.SeriesInstanceUID
    assert _heart(tmp_path / "out", case_id) == pytest.approx(1443, rel=0.02)
    assert any("the series its labels belong to" in line and f"left out: {other} (3 axial"
               in line for line in lines), lines


def test_labels_on_two_series_refused(shared_data: Path, tmp_path: Path) -> None:
    src = _copy_mock(shared_data, tmp_path / "src" / "a")
    b = tmp_path / "src" / "b"
    other = _second_series(src, ["ct_1.dcm", "ct_2.dcm"], b)
    uids = {str(pydicom.dcmread(src / n).SOPInstanceUID): str(pydicom.dcmread(b / n)
                                                               .SOPInstanceUID)
            for n in ("ct_1.dcm", "ct_2.dcm")}

    def point_at_b(ds: pydicom.Dataset) -> None:
        _new_instance(ds)
        for ref_for in ds.ReferencedFrameOfReferenceSequence:
            for study in ref_for.RTReferencedStudySequence:
                for ser in study.RTReferencedSeriesSequence:
                    ser.SeriesInstanceUID = other
                    for img in ser.ContourImageSequence:
                        img.ReferencedSOPInstanceUID = uids[img.ReferencedSOPInstanceUID]
        for roi in ds.ROIContourSequence:
            for contour in roi.ContourSequence:
                for img in contour.ContourImageSequence:
                    img.ReferencedSOPInstanceUID = uids[img.ReferencedSOPInstanceUID]
    _rewrite(src / "rt.dcm", point_at_b, b / "rt.dcm")
    code, stdout, stderr = _run("data", "import", str(tmp_path / "src"), "--out",
                                str(tmp_path / "out"), "--no-crop")
    assert code == 1 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "label files belong to 2 different CT series" in errors[0]
    assert "--series" in errors[0] and "imported 0 case(s)" in stdout


# --- enhanced multi-frame CT ------------------------------------------------------------


def _enhanced(paths: list[Path], dst: Path, enhanced_class: bool = False) -> pydicom.Dataset:
    """A Legacy Converted Enhanced CT (highdicom) of real slices; optionally relabelled as
    Enhanced CT Image Storage with the rescale moved into the per-frame groups."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom warns about the files' patient names
        image = LegacyConvertedEnhancedCTImage(
            [pydicom.dcmread(p) for p in paths], series_instance_uid=generate_uid(),
            series_number=99, sop_instance_uid=generate_uid(), instance_number=1)
    ds = pydicom.Dataset(image)
    ds.file_meta = image.file_meta
    if enhanced_class:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
        shared = ds.SharedFunctionalGroupsSequence[0]
        transform = shared.PixelValueTransformationSequence[0]
        del shared.PixelValueTransformationSequence
        for k, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
            item = pydicom.Dataset()
            item.RescaleSlope = transform.RescaleSlope
            # Frame 2 gets its own intercept: per-frame values must win over shared ones.
            item.RescaleIntercept = float(transform.RescaleIntercept) + (24 if k == 1 else 0)
            item.RescaleType = "HU"
            frame.PixelValueTransformationSequence = [item]
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return ds


@pytest.mark.parametrize("enhanced_class", [False, True])
def test_enhanced_multiframe_ct_reads_like_its_slices(shared_data: Path, tmp_path: Path,
                                                      enhanced_class: bool) -> None:
    paths = [shared_data / CT3 / n for n in CT3_NAMES]
    plain = read_series(paths)
    ds = _enhanced(paths, tmp_path / "mf.dcm", enhanced_class)
    assert ds.NumberOfFrames == 3
    scan = scan_folder(tmp_path)
    assert [(f.modality, f.frames) for f in scan.dicom] == [("CT", 3)]
    series = read_series([tmp_path / "mf.dcm"])
    assert series.geometry == plain.geometry
    assert series.sop_uids == [ds.SOPInstanceUID] * 3
    expected = plain.hu.copy()
    if enhanced_class:
        frame_two = [i for i, f in enumerate(series.frame_numbers) if f == 2]
        expected[frame_two] += 24
    assert np.array_equal(series.hu, expected)


@pytest.mark.parametrize("problem, message", [
    ("duplicate", r"mf\.dcm frame \d: duplicated slice: same position .* as .*mf\.dcm frame \d"),
    ("no-position", r"mf\.dcm frame 1: multi-frame CT without PlanePositionSequence"),
])
def test_enhanced_ct_bad_frames_refused(shared_data: Path, tmp_path: Path, problem: str,
                                        message: str) -> None:
    ds = _enhanced([shared_data / CT3 / n for n in CT3_NAMES], tmp_path / "mf.dcm")
    frames = ds.PerFrameFunctionalGroupsSequence
    if problem == "duplicate":
        frames[2].PlanePositionSequence[0].ImagePositionPatient = (
            frames[1].PlanePositionSequence[0].ImagePositionPatient)
    else:
        for frame in frames:
            del frame.PlanePositionSequence
    ds.save_as(tmp_path / "mf.dcm", enforce_file_format=True)
    with pytest.raises(FedsegError, match=message) as info:
        read_series([tmp_path / "mf.dcm"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("reference", ["multi-frame", "old slices"])
def test_enhanced_ct_with_rtstruct(shared_data: Path, tmp_path: Path, reference: str) -> None:
    """The RTSTRUCT references the multi-frame object, or the slices it was made from
    (whose UIDs no longer exist: matched by geometry)."""
    src = tmp_path / "src"
    _copy_mock(shared_data, src, ("rt.dcm",))
    ds = _enhanced([shared_data / MOCK / "ct_1.dcm", shared_data / MOCK / "ct_2.dcm"],
                   src / "enhanced.dcm")
    if reference == "multi-frame":
        def to_multiframe(rt: pydicom.Dataset) -> None:
            for ref_for in rt.ReferencedFrameOfReferenceSequence:
                for study in ref_for.RTReferencedStudySequence:
                    for ser in study.RTReferencedSeriesSequence:
                        ser.SeriesInstanceUID = ds.SeriesInstanceUID
                        for img in ser.ContourImageSequence:
                            img.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            for roi in rt.ROIContourSequence:
                for contour in roi.ContourSequence:
                    for img in contour.ContourImageSequence:
                        img.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        _rewrite(src / "rt.dcm", to_multiframe)
    report, lines = _import(src, tmp_path / "out")
    assert report.ok and len(report.cases) == 1, lines
    case_id = report.cases[0]
    assert _heart(tmp_path / "out", case_id) == pytest.approx(1443, rel=0.02)
    by_geometry = any("matched to CT series" in line and "by geometry" in line
                      for line in lines)
    assert by_geometry == (reference == "old slices")


# --- regenerated and blanked UIDs ---------------------------------------------------------


def _anonymise_ct(folder: Path, names: tuple[str, ...] = ("ct_1.dcm", "ct_2.dcm"),
                  frame_of_reference: bool = False, study: bool = False) -> None:
    """Regenerate the CT's SOP and series UIDs (and optionally its frame of reference and
    study UIDs) the way anonymisers do, leaving the RTSTRUCT's references stale."""
    series_uid, for_uid, study_uid = generate_uid(), generate_uid(), generate_uid()

    def change(ds: pydicom.Dataset) -> None:
        _new_instance(ds)
        ds.SeriesInstanceUID = series_uid
        if frame_of_reference:
            ds.FrameOfReferenceUID = for_uid
        if study:
            ds.StudyInstanceUID = study_uid
    for name in names:
        _rewrite(folder / name, change)


@pytest.mark.parametrize("regenerated, frame_note", [
    ("sop+series", "same frame of reference"),
    ("sop+series+for+study", "frame of reference differs too"),
    ("blanked", "frame of reference differs too"),
])
def test_regenerated_uids_matched_by_geometry(shared_data: Path, tmp_path: Path,
                                              regenerated: str, frame_note: str) -> None:
    src = _copy_mock(shared_data, tmp_path / "src")
    # rt-utils' RTSTRUCT names another frame of reference than its CT: give it the CT's,
    # so that "sop+series" is an export whose frame of reference survived.
    frame = str(pydicom.dcmread(src / "ct_1.dcm").FrameOfReferenceUID)
    _rewrite(src / "rt.dcm", lambda ds: setattr(
        ds.ReferencedFrameOfReferenceSequence[0], "FrameOfReferenceUID", frame))
    everything = regenerated != "sop+series"
    _anonymise_ct(src, frame_of_reference=everything, study=everything)
    if regenerated == "blanked":
        def blank(ds: pydicom.Dataset) -> None:
            for ref_for in ds.ReferencedFrameOfReferenceSequence:
                del ref_for.RTReferencedStudySequence
            for roi in ds.ROIContourSequence:
                for contour in roi.ContourSequence:
                    del contour.ContourImageSequence
        _rewrite(src / "rt.dcm", blank)
    report, lines = _import(src, tmp_path / "out")
    assert report.ok and len(report.cases) == 1, lines
    case_id = report.cases[0]
    assert _heart(tmp_path / "out", case_id) == pytest.approx(1443, rel=0.02)
    notes = [line for line in lines if line.startswith("note:")]
    assert len(notes) == 1 and "rt.dcm: RTSTRUCT references" in notes[0], lines
    assert "by geometry" in notes[0] and frame_note in notes[0]
    assert read_case(tmp_path / "out" / case_id).meta.extra["contour_matching"] == "geometry"


@pytest.mark.parametrize("rt_patient", ["OTHER-PATIENT", ""])
def test_geometry_never_crosses_patient_ids(shared_data: Path, tmp_path: Path,
                                            rt_patient: str) -> None:
    """An RTSTRUCT of another PatientID in the CT's folder is not matched by geometry
    (it would put one patient's contours on another's CT); a blank PatientID may be."""
    src = _copy_mock(shared_data, tmp_path / "src")
    _anonymise_ct(src, frame_of_reference=True, study=True)
    _rewrite(src / "rt.dcm", lambda ds: setattr(ds, "PatientID", rt_patient))
    code, _stdout, stderr = _run("data", "import", str(src), "--out",
                                str(tmp_path / "out"), "--no-crop")
    assert "Traceback" not in stderr
    if rt_patient:
        assert code == 1, stderr
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert any("rt.dcm: RTSTRUCT" in line and "fit no CT series" in line
                   for line in errors), stderr
    else:
        assert code == 0, stderr
        assert "by geometry" in stderr + _stdout


def test_geometry_fitting_two_series_refused(shared_data: Path, tmp_path: Path) -> None:
    """Two series of the same patient on the same grid: geometry cannot choose."""
    src = _copy_mock(shared_data, tmp_path / "src" / "a")
    _second_series(src, ["ct_1.dcm", "ct_2.dcm"], tmp_path / "src" / "b")
    _anonymise_ct(src)
    code, _stdout, stderr = _run("data", "import", str(tmp_path / "src"), "--out",
                                str(tmp_path / "out"), "--no-crop")
    assert code == 1 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert any("rt.dcm: RTSTRUCT references" in line and "fit 2 CT series equally by "
               "geometry" in line and "cannot tell which" in line for line in errors), stderr


@pytest.mark.parametrize("shift_mm, reason", [
    (2.5, "halfway between two slices"),
    (40.0, "outside the series' slices"),
])
def test_geometry_misfit_refused(shared_data: Path, tmp_path: Path, shift_mm: float,
                                 reason: str) -> None:
    src = _copy_mock(shared_data, tmp_path / "src")
    _anonymise_ct(src)

    def shift(ds: pydicom.Dataset) -> None:
        for roi in ds.ROIContourSequence:
            for contour in roi.ContourSequence:
                points = [float(v) for v in contour.ContourData]
                points[2::3] = [z + shift_mm for z in points[2::3]]
                contour.ContourData = [f"{v:g}" for v in points]
    _rewrite(src / "rt.dcm", shift)
    _report, lines = _import(src, tmp_path / "out")
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "rt.dcm: RTSTRUCT points at CT series" in errors[0], lines
    assert "fit no CT series there by geometry" in errors[0] and reason in errors[0]


def test_refused_rtstruct_with_regenerated_study_fails_its_patient(shared_data: Path,
                                                                   tmp_path: Path) -> None:
    """A malformed RTSTRUCT whose study UID matches no CT still stops its patient."""
    src = _copy_mock(shared_data, tmp_path / "src")
    _anonymise_ct(src, frame_of_reference=True, study=True)
    _rewrite(src / "rt.dcm", lambda ds: delattr(ds.StructureSetROISequence[0], "ROINumber"))
    report, lines = _import(src, tmp_path / "out")
    assert report.cases == [] and len(report.failed) == 1, lines
    assert any("rt.dcm: malformed RTSTRUCT" in line for line in lines)
    assert any("not imported: its label file" in line for line in lines)


def test_series_kept_images_regenerated(shared_data: Path, tmp_path: Path) -> None:
    """Series UID kept, image UIDs regenerated: geometry decides on that series."""
    src = _copy_mock(shared_data, tmp_path / "src")
    for name in ("ct_1.dcm", "ct_2.dcm"):
        _rewrite(src / name, _new_instance)
    report, lines = _import(src, tmp_path / "out")
    assert report.ok and _heart(tmp_path / "out", report.cases[0]) == pytest.approx(
        1443, rel=0.02)
    assert any(line.startswith("note:") and "by geometry" in line for line in lines)

    def shift(ds: pydicom.Dataset) -> None:  # now the contours sit between the slices
        for contour in ds.ROIContourSequence[0].ContourSequence:
            points = [float(v) for v in contour.ContourData]
            points[2::3] = [z + 2.5 for z in points[2::3]]
            contour.ContourData = [f"{v:g}" for v in points]
    _rewrite(src / "rt.dcm", shift)
    _report, lines = _import(src, tmp_path / "out2")
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "image(s) none of which is in CT series" in errors[0], lines
    assert "do not fit that series by geometry" in errors[0] and "halfway" in errors[0]


# --- degenerate contours -----------------------------------------------------------------


def _add_contours(path: Path, extra: list[list[float]]) -> None:
    """Append CLOSED_PLANAR contours (flat x, y, z lists) to the first ROI."""
    def change(ds: pydicom.Dataset) -> None:
        sequence = ds.ROIContourSequence[0].ContourSequence
        for points in extra:
            contour = pydicom.Dataset()
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(points) // 3
            contour.ContourData = [f"{v:g}" for v in points]
            sequence.append(contour)
    _rewrite(path, change)


def test_degenerate_contours_skipped_rest_kept(shared_data: Path, tmp_path: Path) -> None:
    src = _copy_mock(shared_data, tmp_path / "src")
    _add_contours(src / "rt.dcm", [
        [10.0, 10.0, 65.0],  # one point (a click)
        [10.0, 10.0, 65.0, 20.0, 20.0, 65.0],  # two points (a line)
        [0.0, 0.0, 60.0, 5.0, 5.0, 60.0, 10.0, 10.0, 60.0],  # collinear: zero area
        [1.0, 2.0, 65.0] * 4,  # one point repeated
    ])
    code, _stdout, stderr = _run("data", "import", str(src), "--out", str(tmp_path / "out"),
                                "--no-crop", "--aliases", str(_aliases(tmp_path)))
    assert code == 0 and "Traceback" not in stderr, stderr
    warned = [line for line in stderr.splitlines() if "degenerate contour skipped" in line]
    assert len(warned) == 4, stderr
    assert all("rt.dcm" in line and "ROI 'ROI-1': slice " in line for line in warned)
    assert "slice 2 of 2 (z 65.00 mm): degenerate contour skipped (1 point)" in warned[0]
    assert "(2 distinct points)" in warned[1]
    assert "slice 1 of 2 (z 60.00 mm)" in warned[2] and "zero area" in warned[2]
    assert "(1 point)" in warned[3]
    case_dir = next(p for p in (tmp_path / "out").iterdir() if p.name.startswith("case-"))
    assert int(read_case(case_dir).masks["heart"].sum()) == pytest.approx(1443, rel=0.02)


def _aliases(tmp_path: Path) -> Path:
    path = tmp_path / "aliases.json"
    path.write_text('{"heart": ["ROI-1"]}')
    return path


def test_only_degenerate_contours_leave_organ_unlabelled(shared_data: Path,
                                                         tmp_path: Path) -> None:
    src = _copy_mock(shared_data, tmp_path / "src")

    def lines_only(ds: pydicom.Dataset) -> None:
        for contour in ds.ROIContourSequence[0].ContourSequence:
            contour.ContourData = contour.ContourData[:6]  # first two points
            contour.NumberOfContourPoints = 2
    _rewrite(src / "rt.dcm", lines_only)
    report, lines = _import(src, tmp_path / "out")
    assert report.ok and len(report.cases) == 1, lines
    assert sum("degenerate contour skipped" in line for line in lines) == 2
    assert any("'ROI-1' (heart) is empty" in line for line in lines)
    case = read_case(tmp_path / "out" / report.cases[0])
    assert case.meta.labelled_organs == ()


def test_figure_eight_is_not_degenerate() -> None:
    from fedseg_clinic.imaging.rtstruct import degenerate_reason

    bow_tie = np.array([[0, 0, 5], [4, 4, 5], [4, 0, 5], [0, 4, 5]], dtype=float)
    assert degenerate_reason(bow_tie) is None  # signed areas cancel; even-odd fills it
    assert degenerate_reason(np.array([[0, 0, 5], [1, 1, 5], [3, 3, 5], [0, 0, 5]],
                                      dtype=float)) == "zero area (collinear points)"


# --- symlinked folders ------------------------------------------------------------------


def test_symlinked_folders_followed_once(shared_data: Path, tmp_path: Path) -> None:
    real = _copy_mock(shared_data, tmp_path / "elsewhere" / "patient")
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(real, src / "patient")  # the clinic links patient folders in
    os.symlink(real, src / "same-again")  # a second link to the same folder
    os.symlink(src, real / "loop")  # a link loop
    os.symlink(tmp_path / "absent.dcm", src / "dangling.dcm")
    report, lines = _import(src, tmp_path / "out")
    assert report.ok and len(report.cases) == 1, lines
    assert report.slices == 2
    assert _heart(tmp_path / "out", report.cases[0]) == pytest.approx(1443, rel=0.02)
    assert lines == [f"warning: {src / 'dangling.dcm'}: skipped: broken symbolic link"]
