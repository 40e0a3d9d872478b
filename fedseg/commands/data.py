"""``fedseg data ...``: import clinic DICOM, inspect cases, generate phantom clinics."""

from __future__ import annotations

import json
from pathlib import Path

import click

from fedseg.commands.phantoms import phantoms


@click.group()
def data() -> None:
    """Clinic data: DICOM import, inspection, synthetic phantom clinics."""


@data.command(name="import")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Clinic folder (CASES_DIR) to write cases and manifest.json into.")
@click.option("--clinic", default="clinic", show_default=True, help="Clinic name.")
@click.option("--spacing", nargs=3, type=float, default=None, metavar="Z Y X",
              help="Resample to this voxel size in mm (default: keep native spacing).")
@click.option("--hu-clip", nargs=2, type=float, default=(-1024.0, 3071.0), show_default=True,
              metavar="LO HI", help="Clip HU to this window.")
@click.option("--no-crop", is_flag=True, help="Do not crop to the body.")
@click.option("--aliases", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="JSON/YAML file {organ: [ROI names]} extending the default alias table.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="Share of cases in the validation split.")
@click.option("--seed", type=int, default=0, show_default=True, help="Split seed.")
@click.option("--labelmap-glob", "labelmap_globs", multiple=True,
              help="File-name pattern of NIfTI/NRRD label maps (repeatable; default: "
                   "*seg*/*label* .nrrd/.nii/.nii.gz).")
@click.option("--series", "series_uids", multiple=True, metavar="UID",
              help="CT SeriesInstanceUID to use where a patient has several (repeatable).")
@click.option("--organ-set", "organ_set_name", default="thorax", show_default=True,
              help="Organ set the clinic's cases are labelled for (thorax, head_neck); "
                   "structures of other organs are reported and left out.")
def import_command(
    src: Path, out: Path, clinic: str, spacing: tuple[float, float, float] | None,
    hu_clip: tuple[float, float], no_crop: bool, aliases: Path | None, val_fraction: float,
    seed: int, labelmap_globs: tuple[str, ...], series_uids: tuple[str, ...],
    organ_set_name: str,
) -> None:
    """Import CT with contours under SRC into a clinic folder (CASES_DIR).

    SRC is a folder of DICOM CT series with RTSTRUCT/SEG (or NIfTI/NRRD label maps), or
    NIfTI/NRRD CT volumes: case folders holding ct.nii.gz (image.*, *_ct.*, .nrrd) with a
    segmentations/ folder of one mask per structure or a *seg*/*label* label map (SRC
    may also be one such CT file).
    """
    from fedseg_clinic.errors import FedsegError
    from fedseg_clinic.imaging.importer import DEFAULT_LABELMAP_GLOBS, ImportOptions, import_clinic
    from fedseg_clinic.imaging.volumes import find_volume_cases, import_volume_clinic
    from fedseg_clinic.organs import AliasTable

    options = ImportOptions(
        clinic=clinic,
        spacing=tuple(spacing) if spacing else None,  # type: ignore[arg-type]
        hu_clip=(hu_clip[0], hu_clip[1]),
        crop=not no_crop,
        aliases=AliasTable.from_file(aliases) if aliases else AliasTable(),
        val_fraction=val_fraction,
        seed=seed,
        labelmap_globs=labelmap_globs or DEFAULT_LABELMAP_GLOBS,
        series_uids=series_uids,
        organ_set=organ_set_name,
    )
    if not src.exists():
        raise FedsegError(f"{src}: does not exist")
    # NIfTI/NRRD volume cases when SRC is such a file or holds CT-named volume files.
    if src.is_file() or find_volume_cases(src):
        report = import_volume_clinic(src, out, options)
    else:
        report = import_clinic(src, out, options)
    for problem in report.problems:
        click.echo(problem.line(), err=True)
    click.echo(f"imported {len(report.cases)} case(s) ({report.slices} slices) into {out}; "
               f"{len(report.failed)} patient(s) failed")
    if report.manifest is not None:
        click.echo(f"manifest: {report.manifest}")
    if not report.ok:
        raise SystemExit(1)


@data.command(name="inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect_command(path: Path, as_json: bool) -> None:
    """Shape, spacing and organ volumes of a case folder or a clinic folder."""
    from fedseg_clinic.imaging.inspection import CaseStats, inspect_path, to_json

    stats = inspect_path(path)
    if as_json:
        click.echo(json.dumps(to_json(stats), indent=2))
        return
    cases = [stats] if isinstance(stats, CaseStats) else stats.cases
    for case in cases:
        shape = "x".join(str(v) for v in case.shape)
        spacing = " ".join(f"{v:.3g}" for v in case.spacing)
        split = f" [{case.split}]" if case.split else ""
        click.echo(f"{case.case_id}{split}: shape {shape} (z y x), spacing {spacing} mm, "
                   f"HU {case.hu_min}..{case.hu_max}")
        for organ, organ_stats in sorted(case.organs.items()):
            click.echo(f"  {organ:<13} {organ_stats.voxels:>10d} voxels "
                       f"{organ_stats.volume_cc:>10.1f} cc")
        if case.unmapped_rois:
            click.echo(f"  unmapped ROIs: {', '.join(case.unmapped_rois)}")
    if not isinstance(stats, CaseStats):
        click.echo(f"clinic {stats.clinic}: {len(stats.cases)} case(s), {stats.n_train} train, "
                   f"{stats.n_val} val, {stats.total_voxels} voxels")
        for organ in sorted(stats.organ_cases):
            click.echo(f"  {organ:<13} in {stats.organ_cases[organ]:>4d} case(s) "
                       f"{stats.organ_volume_cc[organ]:>12.1f} cc total")


data.add_command(phantoms)

COMMANDS: list[click.Command] = [data]
