"""Which CT volume of a patient study to import, and which one an RTSTRUCT belongs to.

Real exports are messy in two ways this module handles from the files' headers alone
(no pixel data is read):

- **Several candidate volumes.** A study folder may hold a localiser (scout) that is not
  flagged LOCALIZER, several CT series (contrast phases, a reconstruction), or a scout in
  the same series as the slices. Each series is split into *stacks* (same orientation
  and image size, single- or multi-frame files alike) and
  :func:`choose_stack` picks one: the series the labels reference, else the largest
  axial stack; a tie is refused.
- **UIDs that cannot be trusted.** Anonymisers regenerate or blank the SOP Instance,
  Series and Frame of Reference UIDs, so an RTSTRUCT may reference images that are not
  there under those names. :func:`match_structure_set` then matches by geometry: every
  contour plane must lie on a slice of the series (within half a slice spacing, no two
  planes of one ROI on one slice, none exactly between two slices) and inside its
  in-plane extent; exactly one series of the patient may fit.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedseg_clinic.errors import FedsegError
from fedseg_clinic.imaging.rtstruct import StructureSet
from fedseg_clinic.imaging.series import DicomFile, Geometry

# A contour plane closer than this (in slice spacings) to the middle between two slices
# could belong to either: ambiguous.
HALFWAY_TOLERANCE = 0.05
# Contour points may lie this far (in pixels) outside the image and still fit.
INPLANE_SLACK_PIXELS = 1.0


@dataclasses.dataclass
class Stack:
    """A candidate CT volume: files of one series with one orientation and image size.

    Attributes:
        series_uid: SeriesInstanceUID.
        files: the files.
        part: 0 when the series is one stack, else 1, 2, ... (largest first).
    """

    series_uid: str
    files: list[DicomFile]
    part: int = 0

    @property
    def slices(self) -> int:
        """Number of slices (frames of multi-frame files included)."""
        return sum(max(f.frames, 1) for f in self.files)

    @property
    def orientation(self) -> str:
        """"axial", "coronal", "sagittal" (the patient axis closest to the normal)."""
        normal = self.files[0].normal()
        if normal is None:
            return "unknown orientation"
        return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]

    @property
    def folder(self) -> Path:
        """The deepest folder holding all the stack's files."""
        return Path(os.path.commonpath([str(f.path.parent) for f in self.files]))

    def describe(self) -> str:
        """One-line description: UID, part, slices, orientation, folder."""
        part = f" part {self.part}" if self.part else ""
        return (f"{self.series_uid}{part} ({self.slices} {self.orientation} slice(s) in "
                f"{self.folder})")


def split_stacks(series_uid: str, files: Sequence[DicomFile]) -> list[Stack]:
    """Split one series' files into stacks, largest first."""
    groups: dict[tuple[object, ...], list[DicomFile]] = {}
    for item in files:
        # Multi-frame files group like slices: a volume split over several enhanced
        # files stays one stack (read_series refuses overlapping frames).
        orient = (None if item.orientation is None
                  else tuple(round(v, 3) for v in item.orientation))
        groups.setdefault((orient, item.rows, item.columns), []).append(item)
    ordered = sorted(groups.values(), key=lambda g: -sum(max(f.frames, 1) for f in g))
    if len(ordered) == 1:
        return [Stack(series_uid, ordered[0])]
    return [Stack(series_uid, group, part=i + 1) for i, group in enumerate(ordered)]


def choose_stack(case_id: str, stacks: Sequence[Stack], labelled: set[str],
                 series_filter: Sequence[str] = ()) -> tuple[Stack, str | None]:
    """Pick the CT volume of one patient study.

    Order: the ``--series`` filter; the series the label files (RTSTRUCT, SEG, label
    map) belong to; then the largest axial stack. Non-axial stacks (a scout, a coronal
    reconstruction) are only chosen when nothing else is there or asked for.

    Args:
        case_id: the patient study's case id (for messages).
        stacks: every stack of the study.
        labelled: series UIDs that label files were matched to.
        series_filter: series UIDs given with ``--series``.

    Returns:
        The stack and a one-line note saying why (None when there was one stack).

    Raises:
        FedsegError: one line, when the choice is ambiguous.
    """
    listing = "; ".join(s.describe() for s in stacks)
    n_series = len({s.series_uid for s in stacks})
    pool = list(stacks)
    why = []
    if series_filter and len(pool) > 1:
        pool = [s for s in pool if s.series_uid in series_filter]
        if not pool:
            raise FedsegError(f"{case_id}: none of its {n_series} CT series is among --series "
                              f"{', '.join(series_filter)}: {listing}")
        why.append("picked with --series")
    if len(pool) > 1:
        referenced = [s for s in pool if s.series_uid in labelled]
        if len({s.series_uid for s in referenced}) > 1:
            raise FedsegError(f"{case_id}: label files belong to "
                              f"{len({s.series_uid for s in referenced})} different CT series "
                              f"of one patient study (pick with --series UID): {listing}")
        if referenced:
            pool = referenced
            why.append("the series its labels belong to")
    if len(pool) > 1:
        axial = [s for s in pool if s.orientation == "axial" and s.slices > 1]
        if not axial:
            raise FedsegError(f"{case_id}: {n_series} CT series for one patient study, "
                              f"expected one (pick with --series UID): none of the "
                              f"{len(pool)} candidates is an axial stack of several "
                              f"slices: {listing}")
        most = max(s.slices for s in axial)
        top = [s for s in axial if s.slices == most]
        if len(top) > 1:
            raise FedsegError(f"{case_id}: {n_series} CT series for one patient study, "
                              f"expected one (pick with --series UID): {len(top)} axial "
                              f"stacks of {most} slices each and no label file to choose "
                              f"by: {listing}")
        pool = top
        why.append("the largest axial stack")
    chosen = pool[0]
    if len(stacks) == 1:
        return chosen, None
    others = "; ".join(s.describe() for s in stacks if s is not chosen)
    return chosen, (f"{case_id}: imported CT series {chosen.describe()} ({', '.join(why)}); "
                    f"left out: {others}")


def header_geometry(stack: Stack) -> Geometry | None:
    """The stack's voxel grid from its headers (None when geometry is missing)."""
    first = stack.files[0]
    normal = first.normal()
    if normal is None or first.pixel_spacing is None or first.orientation is None:
        return None
    positions = [np.asarray(p) for f in stack.files for p in f.frame_positions]
    if len(positions) != stack.slices:
        return None
    positions.sort(key=lambda p: float(p @ normal))
    along = np.asarray([float(p @ normal) for p in positions])
    dz = float(np.median(np.diff(along))) if len(along) > 1 else 1.0
    if not dz > 0:
        return None
    orient = np.asarray(first.orientation)
    direction = np.stack([orient[:3], orient[3:], normal], axis=1)
    return Geometry(
        shape=(len(positions), first.rows, first.columns),
        spacing=(dz, first.pixel_spacing[0], first.pixel_spacing[1]),
        origin=tuple(float(v) for v in positions[0]),  # type: ignore[arg-type]
        direction=tuple(tuple(float(v) for v in r) for r in direction),  # type: ignore[misc]
    )


def contour_fit(ss: StructureSet, geometry: Geometry) -> str | None:
    """Why the structure set's contours do not sit on this grid, or None if they do.

    Every closed contour must lie in one plane parallel to the slices, within half a
    slice spacing of a slice centre and not halfway between two, inside the volume
    (with a pixel of slack in-plane); no two contour planes of one ROI may fall on the
    same slice (that is a structure set drawn on another slice grid).
    """
    nz, ny, nx = geometry.shape
    any_contour = False
    for roi in ss.rois:
        planes: dict[int, float] = {}
        for points in roi.contours:
            any_contour = True
            zyx = geometry.lps_to_index(points)
            k_float = float(np.mean(zyx[:, 0]))
            if np.ptp(zyx[:, 0]) > 0.5:
                return f"ROI {roi.name!r} has a contour not parallel to the slices"
            k = round(k_float)
            if abs(abs(k_float - k) - 0.5) < HALFWAY_TOLERANCE:
                return (f"ROI {roi.name!r} has a contour halfway between two slices "
                        f"(index {k_float:.2f})")
            if not 0 <= k < nz:
                return f"ROI {roi.name!r} has a contour outside the series' slices"
            slack = 0.5 + INPLANE_SLACK_PIXELS
            if (zyx[:, 2].min() < -slack or zyx[:, 1].min() < -slack
                    or zyx[:, 2].max() > nx - 1 + slack or zyx[:, 1].max() > ny - 1 + slack):
                return f"ROI {roi.name!r} has a contour outside the image in-plane"
            if k in planes and abs(planes[k] - k_float) > 1e-3:
                return (f"ROI {roi.name!r} has contours in two planes that fall on slice "
                        f"{k + 1} (drawn on another slice grid)")
            planes[k] = k_float
    return None if any_contour else "no closed contours to match"


@dataclasses.dataclass
class Match:
    """Which series a structure set belongs to and how that was found.

    Attributes:
        series_uid: the series (None when none matches).
        by_geometry: True when UIDs could not be trusted and geometry decided.
        note: one line for the import report (matching by geometry), or why none matched.
    """

    series_uid: str | None
    by_geometry: bool = False
    note: str = ""


def match_structure_set(ss: StructureSet, series_files: dict[str, list[DicomFile]],
                        candidates: Sequence[str]) -> Match:
    """The series a structure set belongs to: by UIDs, else by geometry.

    UIDs decide when they can be trusted: a referenced series that is present (and
    holds some of the referenced images, when images are referenced), a series holding
    referenced images, or - without any series or image reference - the frame of
    reference. When the RTSTRUCT references images or a series that are all absent
    (regenerated by an anonymiser), the contours are matched by geometry against
    ``candidates`` (the same patient's series), preferring those in the same frame of
    reference; exactly one must fit.

    Args:
        ss: the structure set.
        series_files: every CT series of the scan (UID -> files).
        candidates: series UIDs geometry may choose from.
    """
    sops = ss.image_sop_uids
    overlap = {uid: len(sops & {f.sop_instance_uid for f in files})
               for uid, files in series_files.items()} if sops else {}
    best = max(overlap, key=lambda u: overlap[u], default=None)
    if best is not None and overlap[best] > 0:
        return Match(best)  # check_reference says if some images are missing
    present = [uid for uid in ss.series_uids if uid in series_files]
    if present and not sops:
        return Match(present[0])
    same_for = [uid for uid, files in series_files.items()
                if files[0].frame_of_reference_uid
                and files[0].frame_of_reference_uid in ss.frame_of_reference_uids]
    if not sops and not ss.series_uids and same_for:
        return Match(same_for[0])
    # The UIDs name nothing here: anonymised. Geometry decides among the candidates.
    pool = present or list(candidates)
    fits: list[str] = []
    reasons: list[str] = []
    for uid in pool:
        for stack in split_stacks(uid, series_files[uid]):
            geometry = header_geometry(stack)
            why = "no slice geometry in its headers" if geometry is None else contour_fit(
                ss, geometry)
            if why is None:
                fits.append(uid)
                break
            reasons.append(f"{uid}: {why}")
    if len(fits) > 1:
        preferred = [uid for uid in fits if uid in same_for]
        if len(preferred) == 1:
            fits = preferred
    refs = ("series " + ", ".join(ss.series_uids) if ss.series_uids
            else f"{len(sops)} image(s)" if sops else "no series or image")
    if len(fits) == 1:
        uid = fits[0]
        frame = ("same frame of reference" if uid in same_for
                 else "frame of reference differs too")
        return Match(uid, by_geometry=True, note=(
            f"{ss.path}: RTSTRUCT references {refs} not found under those UIDs (regenerated "
            f"by an anonymiser?); its contours were matched to CT series {uid} by geometry "
            f"(every contour on a slice, {frame})"))
    if len(fits) > 1:
        return Match(None, note=(
            f"{ss.path}: RTSTRUCT references {refs} not found under those UIDs, and its "
            f"contours fit {len(fits)} CT series equally by geometry ({', '.join(fits)}); "
            "cannot tell which"))
    detail = f" ({'; '.join(reasons[:3])})" if reasons else ""
    if present:
        return Match(None, note=(f"{ss.path}: RTSTRUCT references {len(sops)} image(s) none "
                                 f"of which is in CT series {', '.join(present)}, and its "
                                 f"contours do not fit that series by geometry{detail}"))
    return Match(None, note=(f"{ss.path}: RTSTRUCT points at CT series "
                             f"{', '.join(ss.series_uids) or '(no series reference)'}, which is "
                             f"not in the import folder, and its contours fit no CT series "
                             f"there by geometry{detail}"))
