"""RTSTRUCT parsing, reference checks and even-odd rasterisation onto a CT grid.

Rasteriser choice: a voxel belongs to an ROI when its *centre* lies inside the ROI's
CLOSED_PLANAR contours on that slice by the even-odd rule, so holes (a contour inside a
contour) and several islands per slice work. We fill all contours of a slice together
with a vectorised numpy scanline (edge crossings per row, sorted, filled pairwise),
which is exactly the even-odd rule over the union of edges (= XOR of the polygons).
matplotlib.path.Path.contains_points would give the same answer, but matplotlib is not
among the clinic-side dependencies of ``fedseg_clinic`` (it ships in the compute
package), and skimage is not installed; the tests cross-check our fill against
matplotlib. Crossings use the half-open rule (an edge owns its lower end-point and a
row of centres at x owns [x_in, x_out)), so shared vertices are never counted twice.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.imaging.series import CtSeries, Geometry

logger = logging.getLogger(__name__)

# A closed contour must lie within this many slice spacings of a slice centre.
PLANE_TOLERANCE = 0.25


@dataclasses.dataclass
class Roi:
    """One ROI of a structure set.

    Attributes:
        number: ROINumber.
        name: ROIName as written by the clinic.
        contours: (n, 3) LPS point arrays of the CLOSED_PLANAR contours.
        other_contours: number of contours of other types (points, open lines).
        degenerate: (LPS centre of the contour, why) of each CLOSED_PLANAR contour
            skipped as degenerate: fewer than three distinct points or zero area.
    """

    number: int
    name: str
    contours: list[np.ndarray]
    other_contours: int = 0
    degenerate: list[tuple[np.ndarray, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class StructureSet:
    """The parts of an RTSTRUCT this project uses.

    Attributes:
        path: the file.
        frame_of_reference_uids: ReferencedFrameOfReferenceSequence FrameOfReferenceUIDs.
        series_uids: referenced CT SeriesInstanceUIDs (may be empty).
        image_sop_uids: SOPInstanceUIDs referenced by ContourImageSequence items, both in
            the referenced-series block and on individual contours.
        rois: the ROIs in StructureSetROISequence order.
        matched_by_geometry: set by the importer when the UIDs named no CT here and the
            contours were matched to a series by geometry (see ``imaging.matching``).
    """

    path: Path
    frame_of_reference_uids: list[str]
    series_uids: list[str]
    image_sop_uids: set[str]
    rois: list[Roi]
    matched_by_geometry: bool = False


def _contour_points(contour: pydicom.Dataset) -> np.ndarray:
    """ContourData as floats; parses the raw DS bytes directly when pydicom left them raw.

    pydicom's per-value DS conversion dominates reading a large RTSTRUCT (tens of
    thousands of points); numpy parses the backslash-separated text in one call.
    """
    raw = contour.get_item("ContourData")
    if raw is None:
        raise ValueError("no ContourData")
    if isinstance(raw.value, bytes):
        return np.array(raw.value.replace(b"\\", b" ").split(), dtype=np.float64)
    return np.asarray([float(v) for v in contour.ContourData], dtype=np.float64)


# Points closer than this (mm) to one line enclose nothing.
COLLINEAR_TOLERANCE_MM = 1e-4


def degenerate_reason(points: np.ndarray) -> str | None:
    """Why a closed planar contour encloses nothing, or None for a real one.

    Args:
        points: (n, 3) LPS points of the contour.

    Returns:
        "1 point", "2 distinct points", "zero area (collinear points)" or None.
    """
    n = len(np.unique(points, axis=0))
    if n < 3:
        return f"{n} point" if n == 1 else f"{n} distinct points"
    # All points on one line (the second singular value of the centred points is the
    # spread across the best line): zero area. A self-crossing figure eight, whose signed
    # areas cancel, is not degenerate: the even-odd fill still gives it voxels.
    centred = points - points.mean(axis=0)
    if np.linalg.svd(centred, compute_uv=False)[1] < COLLINEAR_TOLERANCE_MM:
        return "zero area (collinear points)"
    return None


def read_rtstruct(path: Path) -> StructureSet:
    """Parse an RTSTRUCT file.

    Raises:
        FedsegError: naming the file when it is unreadable or not an RTSTRUCT.
    """
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - any read failure is the user's file
        raise FedsegError(f"{path}: cannot read RTSTRUCT ({exc})") from None
    if ds.get("Modality") != "RTSTRUCT" or "StructureSetROISequence" not in ds:
        raise FedsegError(f"{path}: not an RTSTRUCT (Modality {ds.get('Modality')!r})")
    try:
        return _parse_rtstruct(ds, path)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        # Missing or malformed mandatory attributes: the file's problem, not ours.
        raise FedsegError(f"{path}: malformed RTSTRUCT ({type(exc).__name__}: {exc})") from None


def _parse_rtstruct(ds: pydicom.Dataset, path: Path) -> StructureSet:
    fors: list[str] = []
    series: list[str] = []
    sops: set[str] = set()
    for ref_for in ds.get("ReferencedFrameOfReferenceSequence", []):
        if "FrameOfReferenceUID" in ref_for:
            fors.append(str(ref_for.FrameOfReferenceUID))
        for study in ref_for.get("RTReferencedStudySequence", []):
            for ser in study.get("RTReferencedSeriesSequence", []):
                if "SeriesInstanceUID" in ser:
                    series.append(str(ser.SeriesInstanceUID))
                for img in ser.get("ContourImageSequence", []):
                    sops.add(str(img.ReferencedSOPInstanceUID))
    names = {int(r.ROINumber): str(r.get("ROIName", f"ROI {r.ROINumber}"))
             for r in ds.StructureSetROISequence}
    rois = {number: Roi(number=number, name=name, contours=[]) for number, name in names.items()}
    for roi_contour in ds.get("ROIContourSequence", []):
        number = int(roi_contour.ReferencedROINumber)
        roi = rois.get(number)
        if roi is None:
            logger.warning("%s: contours for undeclared ROI number %d ignored", path, number)
            continue
        for contour in roi_contour.get("ContourSequence", []):
            for img in contour.get("ContourImageSequence", []):
                sops.add(str(img.ReferencedSOPInstanceUID))
            if contour.get("ContourGeometricType", "") != "CLOSED_PLANAR":
                roi.other_contours += 1
                continue
            try:
                points = _contour_points(contour)
            except (AttributeError, TypeError, ValueError):
                raise FedsegError(
                    f"{path}: ROI {roi.name!r} has a contour with malformed ContourData"
                ) from None
            if points.size % 3 or points.size == 0:
                raise FedsegError(
                    f"{path}: ROI {roi.name!r} has a contour with {points.size} coordinates "
                    "(need 3 per point)"
                )
            bad = np.flatnonzero(~np.isfinite(points))
            if bad.size:
                # NaN/Inf would reach the rasteriser's index arithmetic and crash it.
                raise FedsegError(
                    f"{path}: ROI {roi.name!r} has ContourData value {points[bad[0]]!r} at "
                    f"point {bad[0] // 3 + 1} (coordinates must be finite)"
                )
            points = points.reshape(-1, 3)
            why = degenerate_reason(points)
            if why is not None:
                # Planning systems write these beside the real contours (a click, a
                # line); they enclose nothing, so skipping one loses no voxel.
                roi.degenerate.append((points.mean(axis=0), why))
                continue
            roi.contours.append(points)
    return StructureSet(path=path, frame_of_reference_uids=fors, series_uids=series,
                        image_sop_uids=sops, rois=list(rois.values()))


def references_series(structure_set: StructureSet, series: CtSeries) -> bool:
    """True when the structure set names this series (by series UID, image or frame)."""
    if series.series_uid in structure_set.series_uids:
        return True
    if structure_set.image_sop_uids & set(series.sop_uids):
        return True
    return (
        not structure_set.series_uids
        and not structure_set.image_sop_uids
        and bool(series.frame_of_reference_uid)
        and series.frame_of_reference_uid in structure_set.frame_of_reference_uids
    )


def check_reference(structure_set: StructureSet, series: CtSeries) -> None:
    """Check that the structure set was drawn on this CT series.

    Referenced images (ContourImageSequence SOPInstanceUIDs) must all belong to the
    series; without image references, the series UID or the FrameOfReferenceUID must
    match.

    Raises:
        FedsegError: naming the RTSTRUCT and what does not match.
    """
    where = structure_set.path
    if structure_set.series_uids and series.series_uid not in structure_set.series_uids:
        raise FedsegError(
            f"{where}: RTSTRUCT references CT series {', '.join(structure_set.series_uids)}, "
            f"not {series.series_uid}"
        )
    if structure_set.image_sop_uids:
        missing = sorted(structure_set.image_sop_uids - set(series.sop_uids))
        if missing:
            raise FedsegError(
                f"{where}: RTSTRUCT references {len(missing)} image(s) not in CT series "
                f"{series.series_uid} (e.g. {missing[0]})"
            )
        return
    if structure_set.series_uids:
        return
    if series.frame_of_reference_uid not in structure_set.frame_of_reference_uids:
        raise FedsegError(
            f"{where}: RTSTRUCT has no image references and its frame of reference "
            f"{', '.join(structure_set.frame_of_reference_uids) or '(none)'} is not the CT's "
            f"{series.frame_of_reference_uid or '(none)'}"
        )


def fill_polygons_even_odd(polygons: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Even-odd fill of polygons given in continuous pixel coordinates.

    Args:
        polygons: (n, 2) arrays of (x, y) vertices (x = column, y = row); closed
            implicitly (last vertex joins the first).
        shape: (rows, columns) of the output.

    Returns:
        bool (rows, columns) mask of pixel centres inside an odd number of polygons.
    """
    rows, cols = shape
    mask = np.zeros(shape, dtype=bool)
    starts, ends = [], []
    for poly in polygons:
        if len(poly) < 3:
            continue
        starts.append(poly)
        ends.append(np.roll(poly, -1, axis=0))
    if not starts:
        return mask
    p0 = np.concatenate(starts)
    p1 = np.concatenate(ends)
    horizontal = p0[:, 1] == p1[:, 1]
    p0, p1 = p0[~horizontal], p1[~horizontal]
    if len(p0) == 0:
        return mask
    ymin = np.minimum(p0[:, 1], p1[:, 1])
    ymax = np.maximum(p0[:, 1], p1[:, 1])
    row_lo = max(int(np.ceil(ymin.min())), 0)
    row_hi = min(int(np.ceil(ymax.max())) - 1, rows - 1)
    if row_hi < row_lo:
        return mask
    ys = np.arange(row_lo, row_hi + 1, dtype=np.float64)[:, None]
    # Half-open in y: an edge crosses row y when ymin <= y < ymax.
    crosses = (ymin[None, :] <= ys) & (ys < ymax[None, :])
    slope = (p1[:, 0] - p0[:, 0]) / (p1[:, 1] - p0[:, 1])
    xs = p0[None, :, 0] + (ys - p0[None, :, 1]) * slope[None, :]
    xs = np.where(crosses, xs, np.inf)
    xs.sort(axis=1)
    counts = crosses.sum(axis=1)
    width = int(counts.max()) if counts.size else 0
    if width == 0:
        return mask
    xs = xs[:, : width - width % 2]
    x_in, x_out = xs[:, 0::2], xs[:, 1::2]
    valid = np.isfinite(x_out)
    # Centres at integer x with x_in <= x < x_out, clipped to the image.
    first = np.clip(np.ceil(x_in), 0, cols).astype(np.int64)
    last = np.clip(np.ceil(x_out), 0, cols).astype(np.int64)
    diff = np.zeros((ys.shape[0], cols + 1), dtype=np.int32)
    row_idx = np.broadcast_to(np.arange(ys.shape[0])[:, None], first.shape)
    np.add.at(diff, (row_idx[valid], first[valid]), 1)
    np.add.at(diff, (row_idx[valid], last[valid]), -1)
    mask[row_lo:row_hi + 1] = np.cumsum(diff[:, :cols], axis=1) > 0
    return mask


@dataclasses.dataclass
class RasterResult:
    """A rasterised ROI and what went wrong on the way.

    Attributes:
        mask: bool (z, y, x) on the target grid.
        outside: number of closed contours that fall outside the volume (skipped or
            clipped at the edge).
        off_plane: number of closed contours not within a slice plane (skipped).
        other_contours: number of point/line contours (never filled).
    """

    mask: np.ndarray
    outside: int = 0
    off_plane: int = 0
    other_contours: int = 0

    def warnings(self, roi_name: str) -> list[str]:
        """Human-readable problems (empty when there are none)."""
        lines = []
        if self.other_contours:
            lines.append(f"ROI {roi_name!r}: {self.other_contours} point/line contour(s) "
                         "not filled")
        if self.outside:
            lines.append(f"ROI {roi_name!r}: {self.outside} contour(s) partly or wholly "
                         "outside the CT volume")
        if self.off_plane:
            lines.append(f"ROI {roi_name!r}: {self.off_plane} contour(s) not on a CT slice "
                         "plane, skipped")
        if not self.mask.any():
            lines.append(f"ROI {roi_name!r}: empty mask")
        return lines


def rasterise_contours(contours: Sequence[np.ndarray], geometry: Geometry,
                       plane_tolerance: float = PLANE_TOLERANCE) -> RasterResult:
    """Rasterise closed planar contours (LPS mm) onto an explicitly given grid.

    Each contour goes to the slice whose centre it lies on (within ``plane_tolerance``
    of a slice spacing); all contours of one slice are filled together by the even-odd
    rule.

    Args:
        contours: (n, 3) LPS point arrays.
        geometry: the target grid (any orientation; contours must be parallel to its
            slices).
        plane_tolerance: how far (in slice spacings) a contour may lie from a slice
            centre; 0.5 for structure sets matched by geometry (half a slice).

    Returns:
        The mask and counts of contours outside the volume or off the slice planes.
    """
    nz, ny, nx = geometry.shape
    result = RasterResult(mask=np.zeros(geometry.shape, dtype=bool))
    per_slice: dict[int, list[np.ndarray]] = {}
    for points in contours:
        zyx = geometry.lps_to_index(points)
        k_float = float(np.mean(zyx[:, 0]))
        k = round(k_float)
        if np.max(np.abs(zyx[:, 0] - k)) > plane_tolerance:
            result.off_plane += 1
            continue
        if not 0 <= k < nz:
            result.outside += 1
            continue
        xy = zyx[:, [2, 1]]
        if (xy[:, 0].min() < -0.5 or xy[:, 1].min() < -0.5 or xy[:, 0].max() > nx - 0.5
                or xy[:, 1].max() > ny - 0.5):
            result.outside += 1
        per_slice.setdefault(k, []).append(xy)
    for k, polygons in per_slice.items():
        result.mask[k] = fill_polygons_even_odd(polygons, (ny, nx))
    return result


def rasterise_roi(roi: Roi, geometry: Geometry,
                  plane_tolerance: float = PLANE_TOLERANCE) -> RasterResult:
    """Rasterise one ROI onto a grid; point/line contours are counted, not filled."""
    result = rasterise_contours(roi.contours, geometry, plane_tolerance)
    result.other_contours = roi.other_contours
    return result
