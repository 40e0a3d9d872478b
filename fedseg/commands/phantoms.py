"""``fedseg data phantoms``: synthetic multi-clinic thoracic CT benchmark."""

from __future__ import annotations

from pathlib import Path

import click

from fedseg_clinic.errors import FedsegError

_DEFAULTS = {"clinics": 3, "patients": 10, "size": 64, "preset": "iid", "quantity_skew": 1.0}


def _floats(option: str, text: str | None) -> list[float] | None:
    """Parse "a,b,c" into floats (None stays None)."""
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise FedsegError(f"{option}: expected comma-separated numbers, got {text!r}") from None


def _ints(option: str, text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise FedsegError(f"{option}: expected comma-separated integers, got {text!r}") from None


def _labels(items: tuple[str, ...], n_clinics: int, current: list[tuple[str, ...]]
            ) -> list[tuple[str, ...]] | None:
    """Apply ``K=organ,organ`` label-protocol overrides (K is the 1-based clinic number)."""
    if not items:
        return None
    out = list(current)
    for item in items:
        key, sep, organs = item.partition("=")
        if not sep or not key.strip().isdigit():
            raise FedsegError(f"--labelled-organs: expected K=organ,organ, got {item!r}")
        k = int(key)
        if not 1 <= k <= n_clinics:
            raise FedsegError(f"--labelled-organs: clinic {k} does not exist (1..{n_clinics})")
        out[k - 1] = tuple(o.strip() for o in organs.split(",") if o.strip())
    return out


@click.command()
@click.option("--out", "out", type=click.Path(path_type=Path), required=True,
              help="Output folder (DIR/clinic-1, ..., DIR/benchmark.json).")
@click.option("--clinics", type=int, default=None, help="Number of clinics [3].")
@click.option("--patients", type=int, default=None,
              help="Patients per clinic (non-iid: mean per clinic) [10].")
@click.option("--size", type=int, default=None, help="In-plane matrix size, >= 16 [64].")
@click.option("--seed", type=int, default=None, help="Master seed [0].")
@click.option("--preset", type=click.Choice(["iid", "non-iid"]), default=None,
              help="Clinic heterogeneity preset [iid].")
@click.option("--spec", "spec_file", type=click.Path(path_type=Path), default=None,
              help="YAML/JSON spec (or a benchmark.json) instead of a preset.")
@click.option("--quantity-skew", type=float, default=None,
              help="Dirichlet alpha of the non-iid patient split (smaller = more skew) [1].")
@click.option("--patients-per-clinic", default=None, help="Explicit counts, e.g. 30,10,5.")
@click.option("--hu-offset", default=None, help="Scanner HU offset per clinic, e.g. 0,60,-50.")
@click.option("--noise-sigma", default=None, help="Noise sigma (HU) per clinic.")
@click.option("--blur-sigma", default=None, help="Blur sigma (mm) per clinic.")
@click.option("--slice-spacing", default=None, help="Slice spacing (mm) per clinic.")
@click.option("--size-scale", default=None, help="Patient size factor per clinic (0.5-1.25).")
@click.option("--labelled-organs", multiple=True,
              help="Label protocol of clinic K: K=body,lung_left,... (repeatable).")
@click.option("--val-fraction", type=float, default=None, help="Validation fraction [0.2].")
@click.option("--dicom", is_flag=True, help="Also write DICOM CT + RTSTRUCT per patient.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
def phantoms(out: Path, clinics: int | None, patients: int | None, size: int | None,
             seed: int | None, preset: str | None, spec_file: Path | None,
             quantity_skew: float | None, patients_per_clinic: str | None,
             hu_offset: str | None, noise_sigma: str | None, blur_sigma: str | None,
             slice_spacing: str | None, size_scale: str | None,
             labelled_organs: tuple[str, ...], val_fraction: float | None, dicom: bool,
             overwrite: bool) -> None:
    """Generate synthetic thoracic CT clinics (see docs/phantoms.md).

    A preset (or --spec FILE) defines the clinics; the per-clinic knob options take one
    value for all clinics or one per clinic, comma-separated.
    """
    import dataclasses

    from fedseg.orchestration import phantoms as ph
    from fedseg_clinic.organs import ORGANS

    # Checked before any work, so a bad folder costs nothing and leaves nothing behind.
    ph.prepare_output(out, overwrite)
    if spec_file is not None:
        given = [name for name, value in (("--clinics", clinics), ("--patients", patients),
                                          ("--size", size), ("--preset", preset),
                                          ("--quantity-skew", quantity_skew))
                 if value is not None]
        if given:
            raise FedsegError(f"--spec {spec_file}: cannot be combined with {', '.join(given)}")
        spec = ph.load_spec(spec_file)
        if seed is not None:
            spec = dataclasses.replace(spec, seed=seed)
    else:
        spec = ph.preset_spec(
            preset or _DEFAULTS["preset"],
            clinics if clinics is not None else _DEFAULTS["clinics"],
            patients if patients is not None else _DEFAULTS["patients"],
            size if size is not None else _DEFAULTS["size"],
            seed if seed is not None else 0,
            quantity_skew if quantity_skew is not None else _DEFAULTS["quantity_skew"],
        )
    if val_fraction is not None:
        spec = dataclasses.replace(spec, val_fraction=val_fraction)
    spec = ph.with_clinic_knobs(
        spec,
        patients=_ints("--patients-per-clinic", patients_per_clinic),
        hu_offset=_floats("--hu-offset", hu_offset),
        noise_sigma=_floats("--noise-sigma", noise_sigma),
        blur_sigma_mm=_floats("--blur-sigma", blur_sigma),
        slice_spacing_mm=_floats("--slice-spacing", slice_spacing),
        size_scale=_floats("--size-scale", size_scale),
        labelled_organs=_labels(labelled_organs, len(spec.clinics),
                                [c.labelled_organs for c in spec.clinics]),
    )
    results = ph.generate_benchmark(spec, out, dicom=dicom, overwrite=overwrite)
    click.echo(f"wrote {sum(len(r.case_ids) for r in results)} phantom cases in "
               f"{len(results)} clinics to {out} (preset {spec.preset}, seed {spec.seed})")
    header = (f"{'clinic':<12} {'train':>5} {'val':>4} {'shape (z,y,x)':>15} {'dz mm':>6} "
              f"{'offset':>6} {'noise':>5} {'blur':>5} {'scale':>5}  labelled")
    click.echo(header)
    for clinic, result in zip(spec.clinics, results, strict=True):
        shape, spacing = spec.grid(clinic)
        partial = ("all" if set(clinic.labelled_organs) == set(ORGANS)
                   else ",".join(clinic.labelled_organs))
        click.echo(
            f"{clinic.name:<12} {result.n_train:>5} {result.n_val:>4} "
            f"{'x'.join(map(str, shape)):>15} {spacing[0]:>6.2f} {clinic.hu_offset:>6.0f} "
            f"{clinic.noise_sigma:>5.0f} {clinic.blur_sigma_mm:>5.1f} "
            f"{clinic.size_scale:>5.2f}  {partial}"
        )
